"""A method is one file and one registration: its options, hooks and plug-ins from outside the package.

- nothing outside `leantune/methods/` compares anything to a method's name (an AST scan);
- the README lists every registered method and each of its flags;
- method options are flags and YAML keys of their own, in --help groups per method, refused for a method that
  does not take them; presets apply to the methods that have the option;
- a method from another package (`tests/ia3_plugin.py`, registered through a real `leantune.methods` entry point
  in a `*.dist-info` on sys.path) appears in --method, --help and the Python API, trains through the CLI and
  saves and loads in its own format; a broken entry point gives one error naming it.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

import pytest
import torch

import leantune.methods as lm
from leantune import cli
from leantune.methods import registry
from leantune.recipes import finetune as ft
from leantune.recipes.facts import BUILTIN
from leantune.recipes.options import method_config

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_METHODS = ["adalora", "allora", "bottleneck", "corda", "dora", "full", "lora", "lt-sft", "qlora", "qst",
                   "rslora", "sara"]


def _strings(node) -> list[str]:
    """String constants a comparison operand or a collection literal names."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    if isinstance(node, ast.Dict):
        return [s for k in node.keys if k is not None for s in _strings(k)]
    return []


def method_name_uses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every comparison with, match on, or collection literal of a method name."""
    hits = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            found = [s for op in (node.left, *node.comparators) for s in _strings(op)]
        elif isinstance(node, ast.MatchValue):
            found = _strings(node.value)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            found = _strings(node)
        else:
            continue
        hits |= {(node.lineno, s) for s in found if s.lower() in names}
    return sorted(hits)


# the same word meaning something else in a file: (file under leantune/, word) -> what it means there
OTHER_MEANINGS = {("optim/galore.py", "full"): "GaLore's proj_type 'full' (project both sides), galore-torch's name"}


def test_nothing_outside_methods_names_a_method():
    names = set(lm.list_methods())
    assert set(BUILTIN_METHODS) <= names
    bad = []
    for path in sorted((ROOT / "leantune").rglob("*.py")):
        rel = path.relative_to(ROOT / "leantune")
        if rel.parts[0] == "methods":
            continue
        bad += [f"leantune/{rel}:{line}: {name!r}" for line, name in method_name_uses(path.read_text(), names)
                if (rel.as_posix(), name) not in OTHER_MEANINGS]
    assert not bad, "method names compared outside leantune/methods/ (ask the registry instead):\n" + "\n".join(bad)


def test_the_scan_finds_what_it_forbids():
    names = {"qlora", "corda"}
    src = ('a = cfg.method == "qlora"\nb = m in ("corda", "x")\nMETHODS = ("lora", "qlora")\n'
           'match m:\n    case "corda": pass\napply(model, "qlora")\n')
    assert method_name_uses(src, names) == [(1, "qlora"), (2, "corda"), (3, "qlora"), (5, "corda")]


def test_readme_lists_every_method_and_its_flags():
    readme = (ROOT / "README.md").read_text()
    methods_section = readme.split("\n## Methods", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in methods_section.splitlines() if ln.startswith("| `")]
    listed = {n for ln in table for n in re.findall(r"`([a-z0-9_-]+)`", ln.split("|")[1])}  # lt-sft: a hyphen
    assert listed == set(BUILTIN_METHODS) == set(lm.list_methods()), "README's method table vs the registry"
    options = methods_section.split("| method | its options", 1)[1].split("\n\n", 1)[0]
    rows = {tuple(re.findall(r"`([a-z0-9_-]+)`", ln.split("|")[1])): set(re.findall(r"`(--[a-z0-9-]+)`", ln))
            for ln in options.splitlines() if ln.startswith("| `")}
    assert sorted(m for ms in rows for m in ms) == BUILTIN_METHODS
    for ms, flags in rows.items():  # each row lists exactly the flags of each of its methods
        for m in ms:
            assert flags == {o.flag for o in lm.method_options(m)}, f"README's options of {m}"


# ---------------------------------------------------------------------------------------------
# method options on the command line and in YAML


def parse(argv: list[str]) -> ft.FinetuneConfig:
    args = cli.build_parser(["finetune", *argv]).parse_args(["finetune", *argv])
    return ft.config_from_args(args)


def test_options_become_the_methods_config():
    cfg = parse(["--method", "adalora", "--init-r", "6", "--target-r", "3", "--delta-t", "2",
                 "--adalora-beta1", "0.9", "--targets", "q_proj,v_proj", "--data", "d.jsonl"])
    assert isinstance(cfg.options, lm.AdaLoraConfig)
    o = cfg.options
    assert (o.init_r, o.target_r, o.deltaT, o.beta1, o.targets) == (6, 3, 2, 0.9, ["q_proj", "v_proj"])
    assert o.alpha == 8  # the method's own default, not LoRA's
    cfg = parse(["--method", "rslora", "--rank", "4", "--data", "d.jsonl"])
    assert type(cfg.options) is lm.RsLoraConfig and cfg.options.r == 4 and cfg.options.use_rslora
    cfg = parse(["--method", "bottleneck", "--bottleneck-size", "4", "--dropout", "0.1", "--data", "d.jsonl"])
    assert (cfg.options.size, cfg.options.dropout) == (4, 0.1)


@pytest.mark.parametrize("argv, flag, takers", [
    (["--method", "lora", "--init-r", "4"], "--init-r", "--method adalora"),
    (["--bottleneck-size", "4"], "--bottleneck-size", "--method bottleneck"),
    (["--method", "bottleneck", "--rank", "4"], "--rank", "--method allora, corda, dora, lora, qlora, rslora"),
    (["--method", "allora", "--alpha", "4"], "--alpha", "adalora"),
    (["--method", "lora", "--corda-mode", "kpa"], "--corda-mode", "--method corda"),
])
def test_an_option_of_another_method_is_refused(argv, flag, takers, tmp_path):
    with pytest.raises(ValueError) as e:
        parse([*argv, "--data", "d.jsonl"])
    method = argv[argv.index("--method") + 1] if "--method" in argv else "lora"
    assert f"{flag} is an option of" in str(e.value) and takers in str(e.value)
    assert str(e.value).endswith(f"not of --method {method}")


def test_yaml_holds_method_options_and_is_checked_too(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: adalora\ninit-r: 6\ntarget_r: 2\ntargets: [q_proj, o_proj]\n")
    cfg = parse(["--config", str(f), "--data", "d.jsonl", "--target-r", "3"])
    assert (cfg.options.init_r, cfg.options.target_r, cfg.options.targets) == (6, 3, ["q_proj", "o_proj"])
    f.write_text("rank: 4\ninit_r: 6\n")
    with pytest.raises(ValueError, match=rf"--config {re.escape(str(f))}: --init-r is an option of --method "
                                         r"adalora, not of --method lora"):
        parse(["--config", str(f), "--data", "d.jsonl"])
    f.write_text("method: adalora\ninit_r: six\n")
    with pytest.raises(ValueError, match="option init_r must be int, got 'six'"):
        parse(["--config", str(f), "--data", "d.jsonl"])


def test_facts_preset_applies_to_the_methods_that_have_its_options():
    assert parse(["--method", "lora"]).options.r == 16 and parse(["--method", "lora"]).options.alpha == 32
    assert parse(["--method", "lora", "--rank", "4"]).options.r == 4  # the user's value beats the preset
    assert parse(["--method", "bottleneck"]).options.size == 16  # a preset --rank is no error for it
    assert parse(["--method", "adalora"]).options.alpha == 32
    assert parse(["--method", "lora", "--data", "d.jsonl"]).options.r == 8  # presets are for the builtin data
    assert parse([]).data == BUILTIN and parse([]).lr == ft.FACTS_PRESET["lr"] and parse(["--lr", "0.5"]).lr == 0.5


def test_python_api_takes_the_methods_config():
    cfg = ft.FinetuneConfig(method="adalora", options=lm.AdaLoraConfig(init_r=6, target_r=2))
    assert cfg.options.init_r == 6
    assert isinstance(ft.FinetuneConfig(method="corda").options, lm.CordaConfig)
    with pytest.raises(TypeError, match=r"method='adalora'\) takes options=AdaLoraConfig\(...\), got LoraConfig"):
        ft.FinetuneConfig(method="adalora", options=lm.LoraConfig())
    assert method_config("allora", {}, {"rank": 4, "bottleneck_size": 2}).r == 4


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.run(["finetune", *argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_groups_options_per_method(capsys):
    out = help_text([], capsys)
    for name in BUILTIN_METHODS:
        assert f"{name}:" in out.split("--method METHOD", 2)[2].split("options", 1)[0]  # --method's help
    assert "options of --method adalora:" in out and "options of --method bottleneck:" in out
    shared = out.split("options shared by several methods", 1)[1].split("\noptions of", 1)[0]
    assert shared.count("--rank") == 1 and "--method allora, corda, dora, lora, qlora, rslora" in " ".join(
        shared.split())
    assert out.count("--rank RANK ") == 1
    only = help_text(["--method", "bottleneck"], capsys)
    assert "options of --method bottleneck:" in only and "--bottleneck-size" in only and "--dropout" in only
    assert "--init-r INIT_R" not in only and "--rank RANK" not in only and "--model" in only


# ---------------------------------------------------------------------------------------------
# a plug-in from another package, through a real entry point


@pytest.fixture
def entry_points(tmp_path, monkeypatch):
    """Install a `leantune.methods` entry point (a `*.dist-info` on sys.path); the registry is restored after."""
    saved = dict(registry._METHODS)
    registry.reset_plugins()

    def install(name: str, value: str):
        info = tmp_path / "site" / f"{name}_pkg-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-pkg\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[leantune.methods]\n{name} = {value}\n")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))

    yield install
    registry._METHODS.clear()
    registry._METHODS.update(saved)
    registry.reset_plugins()


def test_a_broken_plugin_gives_one_error_naming_its_entry_point(entry_points, capsys):
    entry_points("broken", "no_such_module_for_leantune:register")
    with pytest.raises(ValueError, match=r"the leantune.methods entry point 'broken' "
                                         r"\(no_such_module_for_leantune:register\) of package 'broken-pkg' "
                                         r"failed to load: ModuleNotFoundError"):
        lm.list_methods()
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--data", "d.jsonl"])
    assert capsys.readouterr().err.count("entry point 'broken'") == 1


def test_a_plugin_method_trains_saves_and_loads(entry_points, folder, tmp_path, capsys):
    entry_points("ia3", "ia3_plugin:register")
    assert "ia3" in lm.list_methods() and lm.get_method("ia3").source == "entry point ia3"
    assert "options of --method ia3:" in help_text([], capsys) and "--ia3-init" in help_text(["--method", "ia3"],
                                                                                                capsys)
    with pytest.raises(ValueError, match="--ia3-init is an option of --method ia3, not of --method lora"):
        parse(["--ia3-init", "2", "--data", "d.jsonl"])

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "the answer is blue"}]}) + "\n"
                            for i in range(8)))
    out = tmp_path / "out"
    assert cli.run(["finetune", "--model", str(folder), "--data", str(data), "--output", str(out), "--no-progress",
                    "--eval-fraction", "0", "--method", "ia3", "--targets", "down_proj,o_proj", "--lr", "0.3",
                    "--max-steps", "10", "--batch-size", "4", "--schedule", "constant", "--dtype", "fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_loss"] < summary["first_loss"] - 0.1  # it learns
    assert (out / "ia3_config.json").is_file() and not (out / "adapter_config.json").exists()  # its own format
    saved = json.loads((out / "ia3_config.json").read_text())["config"]
    assert saved["targets"] == ["down_proj", "o_proj"]

    model, tok = lm_load(folder)
    ids = torch.tensor([tok.encode("the answer is")])
    with torch.no_grad():
        base = model(ids)
        lm.load_adapter(model, out)  # the generic loader asks the registry whose folder it is
        ours = model(ids)
    scales = [layer.ia3_l["default"].weight for _, layer in lm.adapter_layers(model)]
    assert len(scales) == 2 * 2 and all((s - 1).abs().max() > 1e-3 for s in scales)
    assert (ours - base).abs().max() > 1e-3


def lm_load(folder):
    from leantune.models.loader import load

    return load(folder)


def test_register_method_checks_its_hooks():
    with pytest.raises(TypeError, match=r"unknown hook\(s\) \['save_fn'\]"):
        lm.register_method("x", lm.LoraConfig, lm.apply_lora, save_fn=print)
    with pytest.raises(TypeError, match=r"hook\(s\) \['quantize'\] must be callable"):
        lm.register_method("x", lm.LoraConfig, lm.apply_lora, quantize="nf4")
    assert "x" not in lm.list_methods()
    specs = {s.name: s for s in registry.method_specs()}
    assert specs["qlora"].quantize is not None and specs["corda"].calibrate is not None
    assert specs["bottleneck"].save is not None and specs["adalora"].load is not None
    assert argparse  # the parser is argparse's
