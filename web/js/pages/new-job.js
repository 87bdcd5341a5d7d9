// New job: base model, quantization, LoRA and training settings, presets, and the peak-memory
// estimate (flagged when it does not fit the chosen GPU) before anything is submitted.

import * as api from "../api.js";
import { fill, formatBytes, h } from "../dom.js";

const LORA_TARGETS = { attention: ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear" };

// Presets change only the fields they name. "fits" also shrinks until the estimate fits 24 GB.
const PRESETS = {
  fits24: {
    label: "Fits a 24 GB card",
    fields: { gpu: "24GB", quantization: "rtn", bits: 4, group_size: 128, lora_r: 8, lora_alpha: 16, batch_size: 8, micro_batch_size: 4,
      max_seq_len: 1024, gradient_checkpointing: true },
    shrink: [{ micro_batch_size: 2 }, { micro_batch_size: 1 }, { max_seq_len: 512 }, { bits: 3 }, { bits: 2 }],
  },
  fastest: {
    label: "Fastest",
    fields: { quantization: "rtn", bits: 4, group_size: 128, lora_r: 8, lora_alpha: 16, lora_targets: "attention",
      n_epochs: 1, batch_size: 8, micro_batch_size: 8, max_seq_len: 512, gradient_checkpointing: false },
  },
  quality: {
    label: "Best quality",
    fields: { quantization: "optq", bits: 4, group_size: 64, lora_r: 32, lora_alpha: 64, lora_targets: "all-linear",
      n_epochs: 3, batch_size: 8, micro_batch_size: 4, learning_rate_multiplier: 1, max_seq_len: 2048, gradient_checkpointing: true },
  },
};

export function renderNewJob(main) {
  let options = null;
  let estimateTimer = null;
  let estimateSeq = 0;
  const estimateBox = h("div", { id: "estimate", class: "estimate" }, "Estimating peak memory…");
  const submitError = h("p", { id: "submit-error", class: "error", role: "alert" });
  const form = h("form", { id: "new-job", class: "card form-grid", onsubmit: submit, oninput: scheduleEstimate });

  function field(label, name, control, hint) {
    control.name = name;
    control.id = `job-${name}`;
    return h("label", { class: "field", for: control.id }, h("span", {}, label), control, hint ? h("small", { class: "muted" }, hint) : null);
  }
  const select = (choices) => h("select", {}, choices.map(([value, text]) => h("option", { value }, text)));
  const number = (props) => h("input", { type: "number", ...props });

  function build() {
    const files = options.files.map((f) => [f.id, `${f.filename} (${f.id})`]);
    fill(
      form,
      h("fieldset", { class: "presets" }, h("legend", {}, "Presets"),
        Object.entries(PRESETS).map(([key, preset]) =>
          h("button", { type: "button", class: "secondary", id: `preset-${key}`, onclick: () => applyPreset(preset) }, preset.label))),
      h("fieldset", {}, h("legend", {}, "Data and model"),
        field("Base model", "model", select(options.base_models.map((m) => [m, m]))),
        field("Training file", "training_file", select(files)),
        field("Validation file", "validation_file", select([["", "none"], ...files])),
        field("Suffix", "suffix", h("input", { type: "text", maxlength: 64, placeholder: "optional" }), "part of the model name")),
      h("fieldset", {}, h("legend", {}, "Quantization"),
        field("Method", "quantization", select(options.quantization_methods.map((m) => [m.name, m.label]))),
        field("Bits", "bits", select([])),
        field("Group size", "group_size", select([[32, "32"], [64, "64"], [128, "128"], [-1, "per channel"]]))),
      h("fieldset", {}, h("legend", {}, "LoRA"),
        field("Rank r", "lora_r", number({ min: 1, max: 256, value: 8 })),
        field("Alpha", "lora_alpha", number({ min: 1, max: 512, value: 16 })),
        field("Dropout", "lora_dropout", number({ min: 0, max: 0.9, step: 0.05, value: 0.05 })),
        field("Targets", "lora_targets", select([["attention", "attention (q, k, v, o)"], ["all-linear", "all linear layers"]]))),
      h("fieldset", {}, h("legend", {}, "Training"),
        field("Epochs", "n_epochs", number({ min: 1, max: 50, value: 1 })),
        field("Batch size", "batch_size", number({ min: 1, max: 256, value: 8 })),
        field("Micro-batch size", "micro_batch_size", number({ min: 1, max: 256, value: 4 }), "per forward pass; must divide the batch size"),
        field("Learning-rate multiplier", "learning_rate_multiplier", number({ min: 0.01, max: 10, step: 0.01, value: 1 })),
        field("Max sequence length", "max_seq_len", number({ min: 32, max: 32768, step: 32, value: 1024 })),
        field("Max steps", "max_steps", number({ min: 0, max: 1000000, value: 0 }), "0: the epochs decide"),
        field("Gradient checkpointing", "gradient_checkpointing", h("input", { type: "checkbox", checked: true }))),
      h("fieldset", {}, h("legend", {}, "Fit"),
        field("GPU", "gpu", select(options.gpus.map((g) => [g.name, g.label]))),
        estimateBox),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "submit-job" }, "Start job"), submitError),
    );
    setValues({ group_size: 128, gpu: options.gpus.some((g) => g.name === "24GB") ? "24GB" : options.gpus[0].name });
    const chosen = sessionStorage.getItem("modulora.trainingFile");
    if (chosen && options.files.some((f) => f.id === chosen)) form.elements.training_file.value = chosen;
    form.elements.quantization.addEventListener("change", updateBits);
    updateBits();
    scheduleEstimate();
  }

  function updateBits() {
    const method = options.quantization_methods.find((m) => m.name === form.elements.quantization.value);
    const bits = form.elements.bits;
    const previous = Number(bits.value) || 4;
    fill(bits, method.bits.map((b) => h("option", { value: b }, `${b}-bit`)));
    bits.value = method.bits.includes(previous) ? previous : method.bits[method.bits.length - 1];
  }

  function values() {
    const el = form.elements;
    return {
      model: el.model.value,
      training_file: el.training_file.value,
      validation_file: el.validation_file.value,
      suffix: el.suffix.value.trim(),
      quantization: el.quantization.value,
      bits: Number(el.bits.value),
      group_size: Number(el.group_size.value),
      lora_r: Number(el.lora_r.value),
      lora_alpha: Number(el.lora_alpha.value),
      lora_dropout: Number(el.lora_dropout.value),
      lora_targets: el.lora_targets.value,
      n_epochs: Number(el.n_epochs.value),
      batch_size: Number(el.batch_size.value),
      micro_batch_size: Number(el.micro_batch_size.value),
      learning_rate_multiplier: Number(el.learning_rate_multiplier.value),
      max_seq_len: Number(el.max_seq_len.value),
      max_steps: Number(el.max_steps.value),
      gradient_checkpointing: el.gradient_checkpointing.checked,
      gpu: el.gpu.value,
    };
  }

  function setValues(fields) {
    for (const [name, value] of Object.entries(fields)) {
      const el = form.elements[name];
      if (name === "quantization") {
        el.value = value;
        updateBits();
      } else if (el.type === "checkbox") el.checked = Boolean(value);
      else el.value = value;
    }
  }

  async function applyPreset(preset) {
    setValues(preset.fields);
    for (const step of preset.shrink ?? []) {
      const estimate = await api.estimateMemory(jobBody(values()));
      if (estimate.fits) break;
      setValues(step);
    }
    scheduleEstimate();
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(showEstimate, 250);
  }

  async function showEstimate() {
    const seq = ++estimateSeq;
    try {
      const estimate = await api.estimateMemory(jobBody(values()));
      if (seq !== estimateSeq) return; // a newer edit is being estimated
      estimateBox.classList.toggle("too-big", !estimate.fits);
      fill(
        estimateBox,
        h("div", { class: "estimate-total" }, "Estimated peak memory: ", h("strong", { id: "estimate-peak" }, formatBytes(estimate.peak_bytes))),
        h("div", { id: "estimate-fit", class: estimate.fits ? "ok" : "error" },
          estimate.fits
            ? `Fits the ${estimate.gpu.label}.`
            : `Does not fit the ${estimate.gpu.label}. ${estimate.advice ?? ""}`),
        h("ul", { class: "breakdown muted" },
          Object.entries(estimate.breakdown ?? {}).map(([part, bytes]) => h("li", {}, `${part.replaceAll("_", " ")}: ${formatBytes(bytes)}`))),
      );
    } catch (err) {
      if (seq === estimateSeq) fill(estimateBox, h("span", { class: "error" }, `No estimate: ${err.message}`));
    }
  }

  async function submit(event) {
    event.preventDefault();
    submitError.textContent = "";
    const button = form.querySelector("#submit-job");
    button.disabled = true;
    try {
      const job = await api.createJob(jobBody(values()));
      sessionStorage.removeItem("modulora.trainingFile");
      window.location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      submitError.textContent = err.param ? `${err.param}: ${err.message}` : err.message;
    } finally {
      button.disabled = false;
    }
  }

  main.append(h("h1", {}, "New fine-tuning job"), form);
  Promise.all([api.getDashboardOptions(), api.listFiles()])
    .then(([opts, files]) => {
      options = { ...opts, files };
      if (!files.length) {
        fill(form, h("p", {}, "Upload a dataset first: ", h("a", { href: "#/datasets" }, "Datasets"), "."));
        return;
      }
      build();
    })
    .catch((err) => fill(form, h("p", { class: "error" }, err.message)));
  return () => clearTimeout(estimateTimer);
}

/** The POST /v1/fine_tuning/jobs body: OpenAI fields plus our extras in `hyperparameters`. */
export function jobBody(v) {
  return {
    model: v.model,
    training_file: v.training_file,
    validation_file: v.validation_file || undefined,
    suffix: v.suffix || undefined,
    hyperparameters: {
      n_epochs: v.n_epochs,
      batch_size: v.batch_size,
      micro_batch_size: v.micro_batch_size,
      learning_rate_multiplier: v.learning_rate_multiplier,
      quantization: v.quantization,
      bits: v.bits,
      group_size: v.group_size,
      lora_r: v.lora_r,
      lora_alpha: v.lora_alpha,
      lora_dropout: v.lora_dropout,
      lora_targets: LORA_TARGETS[v.lora_targets],
      max_seq_len: v.max_seq_len,
      max_steps: v.max_steps || undefined,
      gradient_checkpointing: v.gradient_checkpointing,
    },
    metadata: { gpu: v.gpu },
  };
}
