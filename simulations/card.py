"""The privacy model card of an export: Hugging Face model-card format (YAML metadata + Markdown), rendered from
facts gathered from the run's report, checkpoint and ledgers (`simulations.export`). Pure: no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common.accountant_check import GUARANTEE

NOT_COVERED = (
    "a person with records in several departments, or several records about one person (the unit is one record, "
    "not one person)",
    "anything the departments' data reveals without the model, or the fact that a department took part",
    "the held-out evaluation metrics the departments reported (aggregate accuracies, not DP-protected)",
    "side channels: timing, update sizes, which departments answered in which round",
)


@dataclass(frozen=True)
class DepartmentFacts:
    name: str
    n_train: int
    n_test: int
    accuracy: float | None  # the global model's accuracy on its held-out test, last evaluated round
    epsilon: float | None  # spent after the run, as reported by the department and backed by its ledger
    delta: float | None
    accountant: str | None
    ledger_checked: bool  # its ledger was read and cross-checked (else: as the site reported it)


@dataclass(frozen=True)
class CardFacts:
    base_model: str
    base_model_hub_id: str | None  # its Hugging Face Hub id, where known (the packaged MiniLM)
    base_model_dir: str | None
    base_fingerprint: str
    finetune: str
    lora_r: int
    lora_alpha: int
    adapter: bool
    mean_pooling: bool
    labels: tuple[str, ...]
    max_length: int
    departments: tuple[DepartmentFacts, ...]
    dp: bool
    secagg: bool
    secagg_num_shares: float
    secagg_threshold: float
    rounds: int
    global_accuracy: float | None
    central_accuracy: float | None
    federated_accuracy: float | None
    versions: dict[str, str]
    run_config_sha256: str
    run_dir: str
    exported: str
    job_settings: dict[str, Any]
    privacy_unit: str


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metadata(f: CardFacts) -> str:
    tags = ["text-classification", "federated-learning", "fedsilo"]
    tags += ["differential-privacy"] if f.dp else []
    tags += ["secure-aggregation"] if f.secagg else []
    tags += ["lora", "peft"] if f.finetune == "lora" else []
    lines = ["---", "library_name: " + ("peft" if f.adapter else "transformers"), "pipeline_tag: text-classification",
             "tags:"] + [f"- {t}" for t in tags]
    if f.base_model_hub_id is not None:
        lines.append(f"base_model: {json.dumps(f.base_model_hub_id)}")
    lines += ["model-index:", "- name: fedsilo federated model", "  results:", "  - task:",
              "      type: text-classification", "    metrics:", "    - type: accuracy",
              f"      value: {_num(f.global_accuracy)}", "      name: global held-out accuracy", "---"]
    return "\n".join(lines)


def _privacy(f: CardFacts) -> list[str]:
    if not f.dp:
        return ["## Privacy", "", "**Trained without differential privacy** (a non-private baseline): the model "
                "carries no formal guarantee for the departments' records.", ""]
    spent = [d.epsilon for d in f.departments if d.epsilon is not None]
    deltas = sorted({d.delta for d in f.departments if d.delta is not None})
    lines = ["## Privacy guarantee", "",
             f"Differential privacy by DP-SGD (Opacus) at each department: {GUARANTEE}.", "",
             f"- **Privacy unit:** {f.privacy_unit}.",
             f"- **Overall:** (epsilon <= {_num(max(spent) if spent else None)}, delta = "
             f"{', '.join(f'{d:g}' for d in deltas) or 'as set by each site'}) for any one record.",
             "", "| department | training records | test records | epsilon | delta | accountant | source |",
             "|---|---:|---:|---:|---:|---|---|"]
    for d in f.departments:
        source = "site ledger, cross-checked" if d.ledger_checked else "reported by the site (ledger not presented)"
        lines.append(f"| {d.name} | {d.n_train} | {d.n_test} | {_num(d.epsilon)} | "
                     f"{'n/a' if d.delta is None else f'{d.delta:g}'} | {d.accountant or 'n/a'} | {source} |")
    lines += ["", "The guarantee does **not** cover:"] + [f"- {item}" for item in NOT_COVERED] + [""]
    return lines


def _secagg(f: CardFacts) -> list[str]:
    if not f.secagg:
        return ["## Aggregation", "", "Updates were aggregated **in the clear**: the server saw each department's "
                "update.", ""]
    return ["## Secure aggregation", "",
            "Flower's SecAgg+: the server only ever saw the sum of the departments' (DP-noised) updates. Each "
            "department's masks are secret-shared among its neighbours "
            f"(`secagg-num-shares` {f.secagg_num_shares:g}{_shares(f.secagg_num_shares)}); unmasking a department "
            f"needs a fraction {f.secagg_threshold:g} of its neighbourhood's shares "
            "(`secagg-reconstruction-threshold`, always a majority), so fewer colluding neighbours than that cannot "
            "unmask its update with a server that follows the protocol; a server that also lies about who dropped "
            "needs 2t - k colluders for a threshold of t shares among k neighbours (docs/threat-model.md).", ""]


def _shares(num_shares: float) -> str:
    if num_shares == 1:
        return ": every department is every other's neighbour"
    if num_shares < 1:
        return ": that fraction of the departments"
    return (f": every department is every other's neighbour in rounds of up to {num_shares:g} departments, "
            f"{num_shares:g} neighbours each (itself included) in larger ones")


def _usage(f: CardFacts) -> list[str]:
    load = ("from peft import PeftConfig, PeftModel\n"
            "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer\n"
            "base = AutoModelForSequenceClassification.from_pretrained(\n"
            "    PeftConfig.from_pretrained(DIR).base_model_name_or_path, config=AutoConfig.from_pretrained(DIR))\n"
            "model = PeftModel.from_pretrained(base, DIR).merge_and_unload().eval()\n") if f.adapter else (
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            "model = AutoModelForSequenceClassification.from_pretrained(DIR).eval()\n")
    common = "import torch\n" + load + "tokenizer = AutoTokenizer.from_pretrained(DIR)\n" \
        "inputs = tokenizer(texts, padding=True, truncation=True, return_tensors='pt')\n"
    if f.mean_pooling:
        body = ("with torch.no_grad():  # mean pooling over the attention mask (1_Pooling/config.json)\n"
                "    hidden = model.base_model(**inputs).last_hidden_state\n"
                "    mask = inputs['attention_mask'].unsqueeze(-1).to(hidden.dtype)\n"
                "    logits = model.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))\n")
    else:
        body = "with torch.no_grad():\n    logits = model(**inputs).logits\n"
    pooling = ("It pools by **masked mean** over the tokens, as its base checkpoint was trained (declared in "
               "`1_Pooling/config.json`, the sentence-transformers convention); the weights hold no [CLS] pooler, "
               "so use the lines below, not `pipeline(...)`." if f.mean_pooling else
               "It uses BERT's [CLS] pooler: `pipeline('text-classification', model=DIR)` works as is.")
    return ["## How to use", "", pooling, "", "```python", common + body +
            "labels = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]", "```", "",
            f"Or: `fedsilo predict --model DIR --input FILE --text-column text --output FILE`. Texts are truncated "
            f"to {f.max_length} tokens, as in training.", ""]


def model_card(f: CardFacts) -> str:
    method = (f"LoRA (r={f.lora_r}, alpha={f.lora_alpha}) on the attention's query/value, classifier head trained; "
              + ("shipped as a PEFT adapter" if f.adapter else "merged into the base weights")
              if f.finetune == "lora" else "all weights fine-tuned")
    settings = ", ".join(f"{k} {v}" for k, v in f.job_settings.items())
    lines = [_metadata(f), "", "# Federated text classifier (fedsilo)", "",
             f"Fine-tuned by {len(f.departments)} departments together with fedsilo (Flower + Opacus DP-SGD"
             f"{' + SecAgg+' if f.secagg else ''}); the departments' records never left them.", "",
             "## Model", "",
             f"- **Base model:** {f.base_model_hub_id or f.base_model}"
             + (f" (`{f.base_model_dir}`)" if f.base_model_dir else " (random test weights)"),
             f"- **Base weights fingerprint** (sha256, as the departments verified it): `{f.base_fingerprint}`",
             f"- **Fine-tuning:** {method}",
             f"- **Labels:** {', '.join(f'{i}: {label}' for i, label in enumerate(f.labels))}",
             f"- **Rounds:** {f.rounds}; per round and department: {settings}", "",
             *_privacy(f), *_secagg(f),
             "## Evaluation", "",
             f"- **Global held-out accuracy:** {_num(f.global_accuracy)}"
             + (f" (central, on the union of the departments' test splits; federated: {_num(f.federated_accuracy)})"
                if f.central_accuracy is not None else " (federated, over the departments' test splits)"),
             "", "| department | test records | accuracy |", "|---|---:|---:|"]
    lines += [f"| {d.name} | {d.n_test} | {_num(d.accuracy)} |" for d in f.departments]
    lines += ["", *_usage(f), "## Provenance", "",
              f"- Exported {f.exported} from `{f.run_dir}`",
              f"- Run config sha256: `{f.run_config_sha256}`",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(f.versions.items())), ""]
    return "\n".join(lines)
