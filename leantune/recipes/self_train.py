"""`leantune finetune --objective self-train`: LiST (Wang et al. 2022, microsoft/LiST @4d461bc) on classification
rows, for an encoder classifier loaded through transformers (`AutoModelForSequenceClassification`; leantune's own
model zoo is decoder-only, so this path needs the `leantune[encoders]` extra).

1. teacher: a fresh adapter (--method) and the classification head, trained on the labelled few (--data);
2. for --self-train-iterations sessions: the teacher's soft labels on --unlabeled; a student re-initialized from
   the pretrained model with a fresh adapter (only adapter and head trainable) learns them under LiST's meta
   re-weighting (`train.self_train`), then finetunes on the labelled few; the student becomes the teacher.

Output: the final student's adapter (the method's format, PEFT's for LoRA) and its head in `head.safetensors`
(`load_self_trained` reads both back), `self_train.jsonl` (teacher and student accuracy per iteration on
--eval-data), `summary.json`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

HEAD_FILE = "head.safetensors"
LOG_FILE = "self_train.jsonl"
# the meta re-weighting differentiates through a gradient, and torch's fused CPU attention kernels have no
# second derivative; plain attention does
EAGER = "eager"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("--objective self-train trains a transformers encoder classifier (e.g. a BERT or MiniLM "
                          "folder); install the extra: pip install 'leantune[encoders]'") from None
    return transformers


def check_model_folder(path: str | None) -> Path:
    """--model must be a local encoder folder (config.json): its tokenizer is read before any weight."""
    if not path:
        raise ValueError("--objective self-train needs --model ENCODER_FOLDER (a Hugging Face folder of an encoder "
                         "such as BERT or all-MiniLM-L6-v2); the default model is a decoder, not a classifier")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {path}: not a Hugging Face model folder (no config.json); --objective "
                         "self-train loads an encoder classifier from a local folder")
    return folder


def _remap(examples: list, names: list | None, own: list | None, n_classes: int, path: str, what: str) -> list:
    """`examples` of another file with their class ids in --data's numbering; a class --data lacks stops the run."""
    for e in examples:
        if names is not None:
            if own is None:
                raise ValueError(f"{path}: {what} labels are class ids but --data's are class names {names}; "
                                 "use the same kind in both")
            name = own[e.label]
            if name not in names:
                raise ValueError(f"{path}: {what} label {name!r} (line {e.line}) is not a class of --data {names}")
            e.label = names.index(name)
        elif own is not None:
            raise ValueError(f"{path}: {what} labels are class names but --data's are class ids; use the same "
                             "kind in both")
        elif e.label >= n_classes:
            raise ValueError(f"{path}: {what} label {e.label} (line {e.line}) is out of range: --data has classes "
                             f"0..{n_classes - 1}")
    return examples


def read_data(cfg, tok) -> tuple[list, list, list, list | None, int]:
    """(labelled, eval, unlabeled token ids, class names or None, number of classes), all read and checked
    before the model's weights."""
    from ..data import parse_columns
    from ..data.classification import load_classification_dataset, load_unlabeled_texts

    on_long = "truncate" if cfg.truncate else "error"
    columns = parse_columns(cfg.columns)
    labeled, names = load_classification_dataset(cfg.data, tok, cfg.max_length, on_long, cfg.split, columns)
    n_classes = len(names) if names else max(e.label for e in labeled) + 1
    if n_classes < 2:
        raise ValueError(f"{cfg.data}: --data has one class only; a classifier needs at least two")
    evals = []
    if cfg.eval_data:
        evals, own = load_classification_dataset(cfg.eval_data, tok, cfg.max_length, on_long, cfg.eval_split,
                                                 columns, what="--eval-data")
        evals = _remap(evals, names, own, n_classes, cfg.eval_data, "--eval-data")
    unlabeled = load_unlabeled_texts(cfg.unlabeled, tok, cfg.max_length, on_long)
    return labeled, evals, unlabeled, names, n_classes


def head_names(model) -> list[str]:
    """The classifier head's parameters: everything outside the pretrained backbone (`base_model_prefix`)."""
    prefix = model.base_model_prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def load_encoder(folder: Path, n_classes: int, names: list | None):
    """The pretrained encoder with a new head of `n_classes` (fp32, eval mode)."""
    import torch

    t = _transformers()
    labels = names or [str(i) for i in range(n_classes)]
    return t.AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=n_classes, id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)}, dtype=torch.float32, ignore_mismatched_sizes=True,
        attn_implementation=EAGER)


def with_adapter(base, method: str, options):
    """A copy of the pretrained `base` with a fresh adapter of `method`; only the adapter and the head train.
    The head is kept out of "all-linear" (it trains in full, so an adapter on it would be redundant)."""
    from .. import methods

    model = copy.deepcopy(base)
    head = {n.rsplit(".", 1)[0] for n in head_names(model)}
    model.all_linear_excluded = lambda: head
    try:
        methods.apply(model, method, config=options)
    except ValueError as e:
        targets = getattr(options, "targets", None)
        raise ValueError(f"--method {method}{f' --targets {targets!r}' if targets else ''}: {e}") from None
    params = dict(model.named_parameters())
    for n in head_names(model):
        params[n].requires_grad_(True)
    return model


def save_head(model, out: Path) -> None:
    """The head's weights, written to a temp name then renamed, so a cut run leaves no half file."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    tmp = out / (HEAD_FILE + ".tmp")
    save_file({n: params[n].detach().contiguous() for n in head_names(model)}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / HEAD_FILE)


def load_self_trained(model_folder: str, out: str):
    """The classifier a self-train run saved in `out`: the encoder of `model_folder`, the adapter and the head."""
    import torch
    from safetensors.torch import load_file

    from .. import methods

    t = _transformers()
    config = t.AutoConfig.from_pretrained(str(out))
    model = t.AutoModelForSequenceClassification.from_pretrained(
        model_folder, config=config, dtype=torch.float32, ignore_mismatched_sizes=True, attn_implementation=EAGER)
    head = load_file(str(Path(out) / HEAD_FILE))
    missing = sorted(set(head_names(model)) - set(head))
    if missing:
        raise ValueError(f"{out}/{HEAD_FILE}: lacks the head weights {missing}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in head.items():
            params[n].copy_(v)
    methods.load_adapter(model, out)
    return model.eval()


def labeled_steps(cfg, n: int) -> int:
    return cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n / cfg.batch_size)


def self_train(cfg) -> dict:
    """Run LiST; returns the summary (also OUTPUT/summary.json)."""
    return run_self_train(cfg)[1]


def run_self_train(cfg) -> tuple:
    """(final student model, summary) of a LiST run: the model as trained, to compare with what was saved."""
    import torch

    from .. import methods
    from ..train import self_train as st

    t0 = time.perf_counter()
    folder = check_model_folder(cfg.model)
    t = _transformers()
    tok = t.AutoTokenizer.from_pretrained(str(folder))
    labeled, evals, unlabeled, names, n_classes = read_data(cfg, tok)
    _log(f"self-train data: {len(labeled)} labelled, {len(unlabeled)} unlabeled, {len(evals)} eval rows, "
         f"{n_classes} classes")
    torch.manual_seed(cfg.seed)  # the new head's init
    base = load_encoder(folder, n_classes, names)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    steps = labeled_steps(cfg, len(labeled))

    def acc(model) -> float | None:
        return st.accuracy(model, evals, pad) if evals else None

    teacher = with_adapter(base, cfg.method, cfg.options)
    losses = st.fit_labeled(teacher, labeled, steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.seed, pad)
    records = [{"iteration": 0, "teacher_accuracy": None, "student_accuracy": acc(teacher),
                "labelled_loss": losses[-1]}]
    if not evals:
        _log("no --eval-data: accuracy is not measured (self_train.jsonl holds null)")
    _log(f"teacher (labelled only): eval accuracy {records[0]['student_accuracy']}")
    settings = st.StudentSettings(cfg.self_train_steps, cfg.unlabeled_batch_size, cfg.batch_size, cfg.student_lr,
                                  cfg.weight_decay, cfg.meta_lr if cfg.meta_lr is not None else cfg.lr,
                                  cfg.meta_warmup, cfg.seed)
    for it in range(1, cfg.self_train_iterations + 1):
        probs = st.predict_probs(teacher, unlabeled, pad)
        student = with_adapter(base, cfg.method, cfg.options)  # re-initialized from the pretrained model
        s = st.fit_student(student, unlabeled, probs, labeled, settings, pad)
        fl = st.fit_labeled(student, labeled, steps, cfg.batch_size, cfg.student_lr, cfg.weight_decay,
                            cfg.seed + it, pad)
        rec = {"iteration": it, "teacher_accuracy": records[-1]["student_accuracy"], "student_accuracy": acc(student),
               "soft_label_loss": s["losses"][-1], "zero_weight_share": s["mean_zero_weight"],
               "labelled_loss": fl[-1]}
        records.append(rec)
        _log(f"iteration {it}: teacher accuracy {rec['teacher_accuracy']} -> student {rec['student_accuracy']}")
        teacher = student
    (out / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    methods.save(teacher, out, base_model_name_or_path=str(folder))
    save_head(teacher, out)
    teacher.config.save_pretrained(str(out))  # num_labels and id2label for `load_self_trained`
    tok.save_pretrained(str(out))
    n_train = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    summary = {"objective": "self-train", "iterations": records, "trainable_parameters": n_train,
               "seconds": round(time.perf_counter() - t0, 1), "adapter": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nstudent adapter and head saved to {out}")
    return teacher, summary
