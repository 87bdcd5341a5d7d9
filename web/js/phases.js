// What a job is doing now, for the top of its page: queued → quantizing → validating → training →
// evaluating → exporting, each with its progress where known.
//
// The worker reports phases itself (a metrics-stream event `phase` and a log event whose `data` is
// {phase, done, total, unit, eta_s, message}, `core/phases.py`); for jobs that ran before it did,
// the phase is read from the job's status, its log messages and its step metrics.

export const PHASES = [
  { name: "queued", label: "Queued" },
  { name: "quantizing", label: "Quantizing" },
  { name: "validating", label: "Validating files" },
  { name: "training", label: "Training" },
  { name: "evaluating", label: "Evaluating" },
  { name: "exporting", label: "Exporting" },
];
const INDEX = new Map(PHASES.map((p, i) => [p.name, i]));
const UNITS = { quantizing: "layer", validating: "file", training: "step", evaluating: "example" };

/** A phase report from the worker, as the stream or a log event carries it; null if `data` is none. */
export function readPhase(data) {
  if (!data || typeof data !== "object" || !INDEX.has(data.phase)) return null;
  const number = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  return {
    phase: data.phase,
    done: number(data.done),
    total: number(data.total),
    unit: typeof data.unit === "string" ? data.unit : UNITS[data.phase] ?? null,
    etaS: number(data.eta_s),
    message: typeof data.message === "string" ? data.message : null,
    explicit: true,
  };
}

// Today's worker messages (worker/tasks/train.py) and the phase each one starts.
const MESSAGE_PHASES = [
  [/^Created fine-tuning job/, "queued", () => "Queued: waiting for a worker"],
  [/^Started on (\S+)/, "quantizing", (m) => `Started on ${m[1]}: preparing the base model`],
  [/^Quantizing /, "quantizing", (m) => m.input],
  [/^Using the quantized base/, "validating", () => "Loading the base model and validating the files"],
  [/^Files validated/, "training", (m) => `${m.input}; starting training`],
  [/^Resuming from checkpoint/, "training", (m) => m.input],
  [/^Out of memory; retrying/, "training", (m) => m.input],
  [/^Validation loss/, "exporting", () => "Exporting the adapter"],
];

/** The phase a log message implies, or null. */
export function phaseFromMessage(message) {
  for (const [pattern, phase, label] of MESSAGE_PHASES) {
    const match = pattern.exec(message ?? "");
    if (match) return { phase, done: null, total: null, unit: null, etaS: null, message: label(match), explicit: false };
  }
  return null;
}

/**
 * The phase to show: the worker's own report when it sends one, else what the log and the step
 * metrics imply. `reported` is the latest phase seen (explicit or read from a message), `metrics`
 * the latest step ({step, totalSteps, etaS}).
 */
export function currentPhase(job, reported, metrics) {
  if (["succeeded", "failed", "cancelled"].includes(job.status)) return { phase: job.status, final: true };
  if (job.status === "validating_files") return { phase: "validating", message: "Validating the files", done: null, total: null };
  if (job.status === "queued" && !reported?.explicit) return { phase: "queued", message: "Queued: waiting for a worker" };
  if (reported?.explicit) {
    if (reported.phase === "training" && metrics?.step !== null && metrics?.step !== undefined) {
      return { ...reported, done: metrics.step, total: metrics.totalSteps ?? reported.total, etaS: metrics.etaS ?? reported.etaS };
    }
    return reported;
  }
  const training = metrics?.step !== null && metrics?.step !== undefined;
  if (training && INDEX.get(reported?.phase ?? "queued") <= INDEX.get("training")) {
    if (metrics.totalSteps && metrics.step >= metrics.totalSteps) {
      return { phase: "evaluating", message: "Training done: evaluating and exporting the adapter" };
    }
    return { phase: "training", done: metrics.step, total: metrics.totalSteps, unit: "step", etaS: metrics.etaS };
  }
  return reported ?? { phase: "queued", message: "Waiting for the worker's first report" };
}

/** "Quantizing: layer 3 of 30 (10%)", "Training: step 4 of 10 (40%)", or the phase's message. */
export function phaseText(current) {
  if (current.final) return null;
  const label = PHASES[INDEX.get(current.phase)]?.label ?? current.phase;
  if (current.done !== null && current.done !== undefined && current.total) {
    const unit = current.unit ?? UNITS[current.phase] ?? "";
    const percent = Math.floor((100 * current.done) / current.total);
    return `${label}: ${unit} ${current.done} of ${current.total} (${percent}%)`.replace(":  ", ": ");
  }
  return current.message ?? label;
}

/** Each phase as done, current or to come (a final job: all done, or stopped at the last one). */
export function phaseStates(current, job, lastReported) {
  if (job.status === "succeeded") return PHASES.map((p) => ({ ...p, state: "done" }));
  const at = current.final ? INDEX.get(lastReported?.phase ?? "queued") ?? 0 : INDEX.get(current.phase) ?? 0;
  return PHASES.map((p, i) => ({
    ...p,
    state: i < at ? "done" : i === at ? (current.final ? "stopped" : "current") : "todo",
  }));
}
