"""GET /v1/models/{id}/export: a fine-tuned model for other stacks, made once and served from exports/."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from utils.tiny_lm import quantize_rtn_, single_thread, tiny_llama, tiny_tokenizer  # noqa: F401

from core.db.models import Job, Model, User
from core.db.session import session_scope
from modulora.export import export_adapter
from modulora.lora import LoraConfig, add_lora_
from modulora.models import save_quantized
from modulora.quant import QuantConfig
from tests.api.conftest import Service

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
IDS = torch.randint(0, 400, (1, 10), generator=torch.Generator().manual_seed(0))


def fine_tuned_model(service: Service, user: str) -> tuple[str, torch.Tensor]:
    """What a succeeded job leaves: a quantized base under bases/, an adapter under adapters/ and a
    Model row; (its id, the logits of base + adapter)."""
    base = quantize_rtn_(tiny_llama(), bits=4, group_size=32)
    base_dir = save_quantized(base, tiny_tokenizer(), QuantConfig(method="rtn", bits=4, group_size=32),
                              service.home / "bases" / "tiny-rtn4")  # fmt: skip
    trained = copy.deepcopy(base)
    add_lora_(trained, LORA)
    torch.manual_seed(1)
    for name, p in trained.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    export_adapter(trained, service.home / "adapters" / "job", base_model="bases/tiny-rtn4",
                   quant_config=None, lora_config=LORA, tokenizer=tiny_tokenizer(),
                   base_model_name_or_path=str(base_dir))  # fmt: skip
    with session_scope() as session:
        owner = session.query(User).filter(User.name == user).one()
        job = Job(user_id=owner.id, model="tiny", training_file="file-x", seed=0, status="succeeded",
                  hyperparameters={"quantization": "rtn"})  # fmt: skip
        session.add(job)
        session.flush()
        model_id = f"ft:tiny::{job.id}"
        session.add(Model(id=model_id, user_id=owner.id, job_id=job.id, parent="tiny",
                          base="bases/tiny-rtn4", path="adapters/job"))  # fmt: skip
    with torch.no_grad():
        return model_id, trained.eval()(IDS).logits


def test_merged_export_is_a_dense_folder_plain_transformers_loads(service: Service, tmp_path: Path) -> None:
    headers = service.new_key("ada")
    model_id, expected = fine_tuned_model(service, "ada")
    response = service.client.get(f"/v1/models/{model_id}/export", headers=headers)
    assert response.status_code == 200, response.text
    zipfile.ZipFile(io.BytesIO(response.content)).extractall(tmp_path / "download")
    (folder,) = (tmp_path / "download").iterdir()
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.dtype == torch.bfloat16
    with torch.no_grad():
        got = merged(IDS).logits.float()
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()  # bf16 weights and activations
    assert (service.home / "exports").is_dir()  # made once, served from there next time
    again = service.client.get(f"/v1/models/{model_id}/export", headers=headers)
    assert again.status_code == 200 and len(again.content) == len(response.content)


def test_export_errors_name_the_field(service: Service) -> None:
    headers = service.new_key("ada")
    model_id, _ = fine_tuned_model(service, "ada")
    not_gguf = service.client.get(f"/v1/models/{model_id}/export?format=gguf-lora", headers=headers)
    assert not_gguf.status_code == 400
    assert (
        not_gguf.json()["error"]["param"] == "format" and "GGUF base" in not_gguf.json()["error"]["message"]
    )
    unknown = service.client.get(f"/v1/models/{model_id}/export?format=onnx", headers=headers)
    assert unknown.status_code == 400 and "format" in unknown.text
    other = service.client.get(f"/v1/models/{model_id}/export", headers=service.new_key("bob"))
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
