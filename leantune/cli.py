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
    "estimate": ("leantune.recipes.estimate", "EstimateConfig", "estimate",
                 "predict the peak memory of a training step from the model's config (no weights read)"),
}


def _load(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    from .recipes.options import add_dataclass_args

    p = argparse.ArgumentParser(prog="leantune", description="Cheap, quick finetuning of pretrained models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, cls, _fn, helptext) in COMMANDS.items():
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options; flags override it")
        add_dataclass_args(sp, _load(mod, cls))
    return p


def run(argv: list[str] | None = None) -> int:
    from .recipes.options import apply_preset, build_config

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    mod, cls_name, fn_name, _ = COMMANDS[args.command]
    cls = _load(mod, cls_name)
    cfg, explicit = build_config(cls, args)
    if args.command == "finetune":
        from .recipes.facts import BUILTIN
        from .recipes.finetune import FACTS_PRESET

        if cfg.data == BUILTIN:  # the main job's settings, unless the user chose otherwise
            cfg = apply_preset(cfg, FACTS_PRESET, explicit)
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
