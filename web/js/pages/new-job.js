// New job: base model, quantization, LoRA and training settings, presets, and the peak-memory and
// training-time estimates (flagged when the job does not fit the chosen GPU) before anything is
// submitted. "Clone and edit" on a job page prefills the form from that job.

import * as api from "../api.js";
import { fill, formatBytes, formatDuration, formatRate, h } from "../dom.js";

const LORA_TARGETS = { attention: ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear" };
const CUSTOM_TARGETS = "custom:";

// The form's training settings before any preset; a preset starts from these, so what it does
// not name is reset rather than kept from an earlier preset. Quantization comes before bits:
// the bits offered depend on it. The settings the CLI and the API share (epochs, LoRA, sequence
// length, schedule, warmup, weight decay, packing) are replaced by the server's own defaults
// (`training_defaults` in /dashboard/options) when the form loads, so all three agree.
const DEFAULTS = {
  quantization: "optq", bits: 4, group_size: 128,
  lora_r: 16, lora_alpha: 16, lora_dropout: 0.05, lora_targets: "all-linear",
  n_epochs: 3, batch_size: 8, micro_batch_size: 4, learning_rate_multiplier: 1, max_seq_len: 512, max_steps: 0,
  schedule: "cosine", warmup_ratio: 0.03, weight_decay: 0, packing: false,
  gradient_checkpointing: true, eval_every: 0, keep_checkpoints: 3,
};  // prettier-ignore
const SHARED_DEFAULTS = ["n_epochs", "lora_r", "lora_alpha", "lora_dropout", "max_seq_len", "schedule", "warmup_ratio",
  "weight_decay", "packing"];  // prettier-ignore

// "fits24" also shrinks, step by step, until the estimate fits 24 GB.
const PRESETS = {
  fits24: {
    label: "Fits a 24 GB card",
    fields: { quantization: "rtn", bits: 4, group_size: 128, lora_r: 8, lora_alpha: 16, batch_size: 8, micro_batch_size: 4,
      max_seq_len: 1024, gradient_checkpointing: true },
    gpu: "24GB",
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
      n_epochs: 3, batch_size: 8, micro_batch_size: 4, max_seq_len: 2048, gradient_checkpointing: true },
  },
};  // prettier-ignore

// Names people give held-out data: such a file is not the training file by default.
const VALIDATION_NAME = /(^|[^a-z])(val|valid|validation|eval|dev|test|heldout)([^a-z]|$)/i;

/** The training file to preselect: the one chosen on the datasets page, else the newest upload
 *  whose name does not look like held-out data, else none (the person picks). */
export function defaultTrainingFile(files, chosen) {
  if (chosen && files.some((f) => f.id === chosen)) return chosen;
  return files.find((f) => !VALIDATION_NAME.test(f.filename))?.id ?? "";
}

export function renderNewJob(main) {
  let options = null;
  let estimateTimer = null;
  let estimateSeq = 0;
  const abort = new AbortController();
  const estimateBox = h("div", { id: "estimate", class: "estimate no-verdict", "aria-live": "polite" }, "Estimating peak memory…");
  const submitError = h("p", { id: "submit-error", class: "error", role: "alert" });
  const prefillNote = h("p", { id: "prefill-note", class: "note", hidden: true });
  const form = h(
    "form",
    { id: "new-job", class: "card form-grid", onsubmit: submit, oninput: onEdit, "aria-busy": "true" },
    h("p", { class: "muted", role: "status", id: "form-loading" }, "Loading the form: base models, your datasets and the GPU list…"),
  );

  function field(label, name, control, hint) {
    control.name = name;
    control.id = `job-${name}`;
    if (hint) control.setAttribute("aria-describedby", `${control.id}-hint`);
    return h("label", { class: "field", for: control.id }, h("span", {}, label), control,
      hint ? h("small", { class: "muted", id: `${control.id}-hint` }, hint) : null);
  }
  const select = (choices) => h("select", {}, choices.map(([value, text, props]) => h("option", { value, ...props }, text)));
  const number = (props) => h("input", { type: "number", ...props });

  function build(clone) {
    const files = options.files.map((f) => [f.id, `${f.filename} (${f.id.slice(-6)})`]);
    const base = formatRate(options.base_learning_rate);
    fill(
      form,
      prefillNote,
      h("fieldset", { class: "presets" }, h("legend", {}, "Presets"),
        h("p", { class: "muted preset-help" }, "A preset sets every training setting; what it does not name returns to its default."),
        Object.entries(PRESETS).map(([key, preset]) =>
          h("button", { type: "button", class: "secondary", id: `preset-${key}`, onclick: () => applyPreset(preset) }, preset.label))),
      h("fieldset", {}, h("legend", {}, "Data and model"),
        field("Base model", "model", select(options.base_models.map((m) => [m, m]))),
        field("Training file", "training_file", select([["", "Choose a training file…", { disabled: true }], ...files])),
        field("Validation file", "validation_file", select([["", "none"], ...files])),
        field("Suffix", "suffix", h("input", { type: "text", maxlength: 64, placeholder: "optional" }), "part of the model name")),
      h("fieldset", {}, h("legend", {}, "Quantization"),
        field("Method", "quantization", select(options.quantization_methods.map((m) => [m.name, m.label]))),
        field("Bits", "bits", select([])),
        field("Group size", "group_size", select([[32, "32"], [64, "64"], [128, "128"], [-1, "per channel"]]))),
      h("fieldset", {}, h("legend", {}, "LoRA"),
        field("Rank r", "lora_r", number({ min: 1, max: 256 })),
        field("Alpha", "lora_alpha", number({ min: 1, max: 512 })),
        field("Dropout", "lora_dropout", number({ min: 0, max: 0.9, step: 0.05 })),
        field("Targets", "lora_targets", select([["attention", "attention (q, k, v, o)"], ["all-linear", "all linear layers"]]))),
      h("fieldset", {}, h("legend", {}, "Training"),
        field("Epochs", "n_epochs", number({ min: 1, max: 50 })),
        field("Batch size", "batch_size", number({ min: 1, max: 256 })),
        field("Micro-batch size", "micro_batch_size", number({ min: 1, max: 256 }), "per forward pass; must divide the batch size"),
        field("Learning-rate multiplier", "learning_rate_multiplier", number({ min: 0.01, max: 10, step: 0.01 }),
          `× the base learning rate ${base}`),
        field("Max sequence length", "max_seq_len", number({ min: 32, max: 32768, step: 32 })),
        field("Max steps", "max_steps", number({ min: 0, max: 1000000 }), "0: the epochs decide"),
        field("Schedule", "schedule", select([["cosine", "cosine"], ["linear", "linear"], ["constant", "constant"]]),
          "the learning rate after warmup"),
        field("Warmup ratio", "warmup_ratio", number({ min: 0, max: 0.99, step: 0.01 }), "fraction of the steps"),
        field("Weight decay", "weight_decay", number({ min: 0, max: 1, step: 0.01 })),
        field("Packing", "packing", h("input", { type: "checkbox" }), "concatenate rows into full sequences"),
        field("Gradient checkpointing", "gradient_checkpointing", h("input", { type: "checkbox" })),
        field("Validate every (steps)", "eval_every", number({ min: 0, max: 1000000 }),
          "with a validation file; 0: at every checkpoint (ten per run)"),
        field("Checkpoints kept", "keep_checkpoints", number({ min: 1, max: 100 }), "the newest, plus the best by validation loss")),
      h("fieldset", {}, h("legend", {}, "Fit and time"),
        field("GPU", "gpu", select(options.gpus.map((g) => [g.name, g.label]))),
        estimateBox),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "submit-job" }, "Start job"), submitError),
    );
    form.removeAttribute("aria-busy");
    form.elements.training_file.required = true;
    form.elements.quantization.addEventListener("change", updateBits);
    for (const name of SHARED_DEFAULTS) if (name in (options.training_defaults ?? {})) DEFAULTS[name] = options.training_defaults[name];
    setValues({ ...DEFAULTS, gpu: options.gpus.some((g) => g.name === "24GB") ? "24GB" : options.gpus[0].name });
    form.elements.training_file.value = defaultTrainingFile(options.files, sessionStorage.getItem("modulora.trainingFile"));
    if (clone) prefill(clone);
    updateLearningRate();
    scheduleEstimate();
  }

  /** Fill the form from a job (Clone and edit); settings the form lacks keep the job's values. */
  function prefill(clone) {
    const hp = clone.hyperparameters ?? {};
    const fields = Object.fromEntries(Object.keys(DEFAULTS).filter((k) => k in hp).map((k) => [k, hp[k]]));
    fields.max_steps = hp.max_steps ?? 0;
    fields.lora_targets = targetsChoice(hp.lora_targets ?? DEFAULTS.lora_targets);
    setValues(fields);
    const has = (id) => options.files.some((f) => f.id === id);
    if (options.base_models.includes(clone.model)) form.elements.model.value = clone.model;
    if (has(clone.training_file)) form.elements.training_file.value = clone.training_file;
    if (clone.validation_file && has(clone.validation_file)) form.elements.validation_file.value = clone.validation_file;
    form.elements.suffix.value = clone.suffix ?? "";
    if (clone.metadata?.gpu && options.gpus.some((g) => g.name === clone.metadata.gpu)) form.elements.gpu.value = clone.metadata.gpu;
    const missing = [clone.training_file, clone.validation_file].filter((id) => id && !has(id));
    prefillNote.hidden = false;
    fill(prefillNote, "Prefilled from job ", h("a", { href: `#/jobs/${clone.id}` }, h("code", {}, clone.id)),
      ": change what you like, then start it.", missing.length ? ` Its file ${missing.join(" and ")} was deleted: choose another.` : "");
  }

  /** The select's value for a job's lora_targets; a list the form does not offer gets its own option. */
  function targetsChoice(targets) {
    if (targets === "all-linear") return "all-linear";
    if (Array.isArray(targets) && targets.join() === LORA_TARGETS.attention.join()) return "attention";
    const list = Array.isArray(targets) ? targets : [targets];
    const value = `${CUSTOM_TARGETS}${list.join(",")}`;
    form.elements.lora_targets.append(h("option", { value }, list.join(", ")));
    return value;
  }

  function updateBits() {
    const method = options.quantization_methods.find((m) => m.name === form.elements.quantization.value);
    const bits = form.elements.bits;
    const previous = Number(bits.value) || 4;
    fill(bits, method.bits.map((b) => h("option", { value: b }, `${b}-bit`)));
    bits.value = method.bits.includes(previous) ? previous : method.bits[method.bits.length - 1];
  }

  function updateLearningRate() {
    const multiplier = Number(form.elements.learning_rate_multiplier.value);
    const hint = form.querySelector("#job-learning_rate_multiplier-hint");
    const base = options.base_learning_rate;
    hint.textContent = `× the base learning rate ${formatRate(base)}` + (multiplier > 0 ? ` = ${formatRate(base * multiplier)}` : "");
  }

  function onEdit(event) {
    if (event.target?.name === "learning_rate_multiplier") updateLearningRate();
    scheduleEstimate();
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
      schedule: el.schedule.value,
      warmup_ratio: Number(el.warmup_ratio.value),
      weight_decay: Number(el.weight_decay.value),
      packing: el.packing.checked,
      gradient_checkpointing: el.gradient_checkpointing.checked,
      eval_every: Number(el.eval_every.value),
      keep_checkpoints: Number(el.keep_checkpoints.value),
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
    setValues({ ...DEFAULTS, ...preset.fields, ...(preset.gpu ? { gpu: preset.gpu } : {}) });
    updateLearningRate();
    try {
      for (const step of preset.shrink ?? []) {
        const estimate = await api.whilePreparing(() => api.estimateMemory(jobBody(values())), { onWait: showPreparing, signal: abort.signal });
        if (estimate.fits) break;
        setValues(step);
      }
    } catch (err) {
      if (abort.signal.aborted) return;
      setVerdict("no-verdict");
      fill(estimateBox, h("span", { class: "error" }, `The preset "${preset.label}" could not check the memory estimate: ${err.message}`));
      return;
    }
    scheduleEstimate();
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(showEstimate, 250);
  }

  /** The box's colour says what it holds: green fits, red too big, grey no verdict (yet). */
  function setVerdict(verdict) {
    for (const name of ["too-big", "no-verdict"]) estimateBox.classList.toggle(name, verdict === name);
  }

  function showPreparing(err) {
    setVerdict("no-verdict");
    fill(estimateBox, h("p", { id: "estimate-preparing", class: "muted" }, `${err.message}`));
  }

  async function showEstimate() {
    const seq = ++estimateSeq;
    try {
      const estimate = await api.whilePreparing(() => api.estimateMemory(jobBody(values())), {
        onWait: (err) => seq === estimateSeq && showPreparing(err),
        signal: abort.signal,
      });
      if (seq !== estimateSeq) return; // a newer edit is being estimated
      setVerdict(estimate.fits ? "fits" : "too-big");
      const time = estimate.time;
      fill(
        estimateBox,
        h("div", { class: "estimate-total" }, "Estimated peak memory: ", h("strong", { id: "estimate-peak" }, formatBytes(estimate.peak_bytes))),
        h("div", { id: "estimate-fit", class: estimate.fits ? "ok" : "error" },
          estimate.fits ? `Fits the ${estimate.gpu.label}.` : `Does not fit the ${estimate.gpu.label}. ${estimate.advice ?? ""}`),
        time
          ? h("div", { class: "estimate-time" }, "Estimated training time: ",
            h("strong", { id: "estimate-time" }, `≈ ${formatDuration(time.total_seconds)}`),
            ` (${time.steps} steps × ${time.step_seconds.toPrecision(2)} s)`,
            h("small", { class: "muted estimate-basis" }, ` An estimate: ${time.basis}.`))
          : null,
        h("details", {}, h("summary", {}, "Memory breakdown"),
          h("ul", { class: "breakdown" },
            Object.entries(estimate.breakdown ?? {}).map(([part, bytes]) => h("li", {}, `${part.replaceAll("_", " ")}: ${formatBytes(bytes)}`)))),
      );
    } catch (err) {
      if (seq === estimateSeq && !abort.signal.aborted) {
        setVerdict("no-verdict");
        fill(estimateBox, h("span", { class: "error", id: "estimate-error" }, `No estimate for these settings: ${err.param ? `${err.param}: ` : ""}${err.message}`));
      }
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
      submitError.textContent = `Could not start the job: ${err.param ? `${err.param}: ` : ""}${err.message}`;
    } finally {
      button.disabled = false;
    }
  }

  async function load() {
    const clone = JSON.parse(sessionStorage.getItem("modulora.cloneJob") ?? "null");
    try {
      const [opts, files] = await Promise.all([api.getDashboardOptions(), api.listFiles()]);
      if (abort.signal.aborted) return;
      options = { ...opts, files };
      sessionStorage.removeItem("modulora.cloneJob");
      if (!files.length) {
        form.removeAttribute("aria-busy");
        fill(form, h("p", {}, "Upload a dataset first: ", h("a", { href: "#/datasets" }, "Datasets"), "."));
        return;
      }
      build(clone);
    } catch (err) {
      form.removeAttribute("aria-busy");
      fill(form, h("p", { class: "error", role: "alert" }, `Could not load the form (options and datasets): ${err.message} `),
        h("button", { type: "button", class: "secondary", onclick: () => (fill(form, h("p", { class: "muted", role: "status" }, "Loading…")), load()) }, "Try again"));
    }
  }

  main.append(h("h1", {}, "New fine-tuning job"), form);
  load();
  return () => {
    abort.abort();
    clearTimeout(estimateTimer);
  };
}

/** The POST /v1/fine_tuning/jobs body: OpenAI fields plus our extras in `hyperparameters`. */
export function jobBody(v) {
  const targets = v.lora_targets.startsWith(CUSTOM_TARGETS) ? v.lora_targets.slice(CUSTOM_TARGETS.length).split(",") : LORA_TARGETS[v.lora_targets];
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
      lora_targets: targets,
      max_seq_len: v.max_seq_len,
      max_steps: v.max_steps || undefined,
      schedule: v.schedule,
      warmup_ratio: v.warmup_ratio,
      weight_decay: v.weight_decay,
      packing: v.packing,
      gradient_checkpointing: v.gradient_checkpointing,
      eval_every: v.eval_every || undefined,
      keep_checkpoints: v.keep_checkpoints,
    },
    metadata: { gpu: v.gpu },
  };
}
