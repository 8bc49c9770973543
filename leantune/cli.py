"""`leantune <command>`: thin argument parsing over the recipes. Every option comes from a recipe's config
dataclass; `--config file.yaml` holds any of them and flags override it."""
from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "finetune": ("leantune.recipes.finetune", "FinetuneConfig", "finetune",
                 "train an adapter on JSONL data (no --data: teach the demo facts to the default model)"),
    "generate": ("leantune.recipes.generate", "GenerateConfig", "generate", "generate text for one or more prompts"),
    "chat": ("leantune.recipes.generate", "GenerateConfig", "chat", "interactive chat that streams tokens"),
    "merge": ("leantune.recipes.generate", "MergeConfig", "merge",
              "merge an adapter into its base and write a plain Hugging Face folder"),
    "serve": ("leantune.recipes.serve", "ServeConfig", "serve",
              "serve the model and adapters over an OpenAI-compatible API; fine-tune inside the serving loop"),
    "export": ("leantune.recipes.export", "ExportConfig", "export",
               "write the merged model (or, with --lora-only, the adapter) as a GGUF file for llama.cpp / Ollama"),
    "select": ("leantune.recipes.select", "SelectConfig", "select",
               "select the k pool rows closest to a target task (GOT-D optimal transport, nearest, random)"),
    "sweep": ("leantune.recipes.sweep", "SweepConfig", "sweep",
              "a grid of finetunes along one axis (data fraction, SFT/DPO share, oracle/weak label share), each "
              "scored by `leantune eval`: table (CSV, Markdown) and plot; finetune options go after --"),
    "estimate": ("leantune.recipes.estimate", "EstimateConfig", "estimate",
                 "predict the peak memory of a training step from the model's config (no weights read)"),
}
# `leantune eval <name>`: evaluations, each a subcommand of `eval` (same layout as COMMANDS)
EVAL_COMMANDS = {
    "knowledge": ("leantune.recipes.eval_knowledge", "KnowledgeEvalConfig", "eval_knowledge",
                  "FineTuneBench against an OpenAI-compatible fine-tuning API: train on a memorization set, score "
                  "memorization and rephrased generalization"),
}
EVAL_MODEL = ("leantune.recipes.eval", "EvalConfig", "eval_model")
EVAL_HELP = ("score a model (+ adapters) on a data file: exact match, ROUGE-L, classification accuracy or loss; "
             "or run an evaluation through an OpenAI-compatible API (`leantune eval knowledge`)")


def _load(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def _method_in(argv: list[str] | None) -> str | None:
    """The --method named on the command line, if it is a registered one (for `finetune --method X --help`)."""
    from .methods.registry import list_methods

    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--method=") else (
            argv[i + 1] if arg == "--method" and i + 1 < len(argv) else None)
        if value is not None:
            return value if value in list_methods() else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from .recipes.options import add_dataclass_args, add_method_args, cli_fields

    p = argparse.ArgumentParser(prog="leantune", description="Cheap, quick finetuning of pretrained models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, cls, _fn, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options; flags override it")
        add_dataclass_args(sp, _load(mod, cls))
        if name == "sweep":  # two values: the axis and its list; the cells' finetune options follow `--`
            sp.add_argument("--axis", nargs=2, metavar=("NAME", "V1,V2,..."), default=argparse.SUPPRESS,
                            help="data-fraction (fractions in (0, 1]), sft-share or oracle-share (shares in [0, 1])")
        if name == "finetune":  # each method's own options, in groups of their own
            add_method_args(sp, {f.name for f in cli_fields(_load(mod, cls))} | {"config"}, only=_method_in(argv))
    # `leantune eval --model M --data F --metric X` scores a model; `leantune eval knowledge ...` (a subcommand)
    # runs FineTuneBench through an API. The subcommand is optional, so both spellings parse.
    ev = sub.add_parser("eval", help=EVAL_HELP, description=EVAL_HELP)
    ev.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options; flags override it")
    add_dataclass_args(ev, _load(*EVAL_MODEL[:2]))
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVALUATION", required=False)
    for name, (mod, cls, _fn, helptext) in EVAL_COMMANDS.items():
        sp = evsub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options; flags override it")
        add_dataclass_args(sp, _load(mod, cls))
    return p


def run(argv: list[str] | None = None) -> int:
    from .recipes.options import build_config

    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if argv[:1] == ["sweep"] and "--" in argv:  # `leantune sweep ... -- <finetune args>`
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args.command == "eval":
        if not getattr(args, "eval_command", None) and not hasattr(args, "data") and not getattr(args, "config", None):
            parser.parse_args(["eval", "--help"])  # prints the options and the evaluations, and exits
        mod, cls_name, fn_name = EVAL_MODEL if not getattr(args, "eval_command", None) else \
            EVAL_COMMANDS[args.eval_command][:3]
        cfg, _ = build_config(_load(mod, cls_name), args)
        _load(mod, fn_name)(cfg)
        return 0
    mod, cls_name, fn_name, _ = COMMANDS[args.command]
    if args.command == "finetune":  # the method's options become its config; the builtin data's preset
        cfg = _load(mod, "config_from_args")(args)
    elif args.command == "sweep":
        cfg, _ = build_config(_load(mod, cls_name), args,
                              preset={"axis": getattr(args, "axis", []), "finetune_args": passed})
    else:
        cfg, _ = build_config(_load(mod, cls_name), args)
    _load(mod, fn_name)(cfg)
    return 0


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = run(argv)
    except KeyboardInterrupt:
        print("\ninterrupted; completed checkpoints are kept (finetune --resume continues from the last one)",
              file=sys.stderr)
        code = 130
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as e:
        print(f"leantune: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
