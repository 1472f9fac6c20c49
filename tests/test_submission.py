"""build_submission.py and the code health it needs: feature blocks, read-only Hyperparameters, roles, defaults."""
import ast
import json
import subprocess
import sys
import warnings

import pytest

import build_submission
import train_gpt
from skcgolf import trainrun
from tiny_lm import REPO_ROOT_FOR_TESTS

SOURCE = (REPO_ROOT_FOR_TESTS / "train_gpt.py").read_text()
SETTINGS = train_gpt.Hyperparameters.SETTINGS


# ----------------------------------------------------------------------------- feature-block convention

def test_train_gpt_follows_the_feature_block_convention():
    assert build_submission.convention_problems(SOURCE, SETTINGS) == []
    blocks, _ = build_submission.feature_blocks(SOURCE)
    assert {"ttt", "eval_engram", "calibration", "temperature_fit", "ema", "turbo_quant", "skc_mixer", "capsules", "koopman",
            "feedback_passes"} <= {b.name for b in blocks}


@pytest.mark.parametrize("text, problem", [
    ("# --- feature: a (NOT_A_SETTING) ---\nx = 1\n# --- end feature: a ---\n", "NOT_A_SETTING is not a setting"),
    ("# --- feature: a (TTT_ENABLED) ---\nx = 1\n", "has no end marker"),
    ("x = 1\n# --- end feature: a ---\n", "without its start"),
    ("# --- feature: a (TTT_ENABLED) ---\n# --- end feature: a ---\n", "must sit in SETTINGS under `# feature: a`"),
    ("# --- featur: a (TTT_ENABLED) ---\n", "malformed feature marker"),
])
def test_convention_problems_are_named(text, problem):
    assert any(problem in found for found in build_submission.convention_problems(text, SETTINGS))


def test_flag_specs_decide_whether_a_feature_is_on():
    spec = build_submission.FlagSpec
    assert spec("TTT_ENABLED", None, None).is_on(True) and not spec("EMA_DECAY", None, None).is_on(0.0)
    assert spec("EXPORT_FORMAT", "=", "int8_zlib").is_on("int8_zlib")
    assert not spec("FP_STORAGE_SIM", "!=", "none").is_on("none")


# ----------------------------------------------------------------------------- code health

def test_hyperparameters_are_read_only_and_replace_makes_a_checked_copy():
    args = train_gpt.Hyperparameters({})
    with pytest.raises(AttributeError, match="read-only"):
        args.vocab_size = 10
    changed = args.replace({"NUM_LAYERS": 4})
    assert changed.num_layers == 4 and args.num_layers == 12
    with pytest.raises(train_gpt.ConfigError, match="NUM_HEADS"):
        args.replace({"NUM_HEADS": 7})


def test_reserved_prefixes_belong_to_existing_settings():
    """A prefix is reserved for a feature that exists, or to reject the design's names with a pointer to ours."""
    named = set(SETTINGS) | set(getattr(train_gpt.Hyperparameters, "DESIGN_ALIASES", {}))
    for prefix in train_gpt.ENV_PREFIXES:
        assert any(name.startswith(prefix) for name in named), f"{prefix} is reserved but no setting uses it"


def test_only_the_roles_table_classifies_parameters():
    """No code decides a parameter's treatment from its name (`"gate" in name`, `name == "tok_emb.weight"`): the module
    that owns a parameter declares its role. The one name rule left is the user's EXPORT_FP16_PATTERNS (fp_protected)."""
    offenders = []
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            literals = [side.value for side in sides if isinstance(side, ast.Constant) and isinstance(side.value, str)]
            if any(isinstance(side, ast.Name) and side.id in ("name", "param_name") for side in sides) and any(
                    "." in text or isinstance(node.ops[0], (ast.In, ast.NotIn)) for text in literals):
                offenders.append(ast.unparse(node))
    assert not offenders


DELIBERATE_DIFFERENCES = {
    # setting: why configs/skc_competition.env differs from the trainer's default
    "SLIDING_EVAL_STRIDE": "the competition evaluates with a sliding window; a plain run evaluates by chunks",
    # The competition config moved to sp8192 with a factored embedding (issue 13); whether the defaults follow is
    # the lead's call, so these are listed here until then.
    "DATA_PATH": "sp8192 data in the competition config", "TOKENIZER_PATH": "sp8192 tokenizer",
    "VOCAB_SIZE": "8192 in the competition config", "EMBED_DIM": "factored embedding in the competition config",
    "EXPORT_FP16_PATTERNS": "set by the competition config",
}


def test_trainer_defaults_are_the_competition_config():
    competition = trainrun.read_env_file(REPO_ROOT_FOR_TESTS / "configs" / "skc_competition.env")
    defaults = train_gpt.Hyperparameters({})
    configured = train_gpt.Hyperparameters(competition)
    differing = {name for name in SETTINGS if getattr(defaults, name.lower()) != getattr(configured, name.lower())}
    assert differing == set(DELIBERATE_DIFFERENCES), (
        f"defaults differ from configs/skc_competition.env for {sorted(differing - set(DELIBERATE_DIFFERENCES))}; "
        f"listed as deliberate but equal: {sorted(set(DELIBERATE_DIFFERENCES) - differing)}")


# ----------------------------------------------------------------------------- dead-code elimination

SMALL_TRAINER = '''
from __future__ import annotations
import json
import os
import numpy as np
REMOVED_SETTINGS: dict[str, str] = {}


def folded_branches(args) -> tuple:
    return ()


def Setting(default):
    return default


class Hyperparameters:
    SETTINGS = {"FOO_ENABLED": Setting(False), "FOO_SIZE": Setting(3), "MODE": Setting("a"), "N": Setting(2)}

    def __init__(self, env):
        if any(name in REMOVED_SETTINGS and env[name] != REMOVED_SETTINGS[name] for name in env):
            raise ValueError("a removed setting")
        self.__dict__.update({name.lower(): env.get(name, default) for name, default in self.SETTINGS.items()})
        if any(bool(now) != extracted for now, extracted, _ in folded_branches(self)):
            raise ValueError("a folded branch would flip")


class Foo:
    def __init__(self, size):
        self.size = size


def only_for_foo() -> Foo:
    return json.dumps({})


def run(args, x, probe):
    assert x >= 0, "asserts stay"
    foo = Foo(args.foo_size) if args.foo_enabled else None
    if args.foo_enabled and x > 1:
        only_for_foo()
    if not args.foo_enabled or x:
        y = 1
    if args.mode == "a":
        z = 2
    else:
        z = 3
    if probe() and args.foo_enabled:
        w = 4
    return args.n, np.zeros(z)


if __name__ == "__main__":
    run(Hyperparameters({}), 1, print)
'''
SMALL_VALUES = {"FOO_ENABLED": False, "FOO_SIZE": 5, "MODE": "a", "N": 2}


def test_dce_folds_conditions_and_removes_what_they_left_unreferenced():
    result = build_submission.dead_code_eliminate(SMALL_TRAINER, SMALL_VALUES, {"FOO_SIZE": "5"})
    source = result.source
    assert "class Foo" not in source and "only_for_foo" not in source and "foo = None" in source
    assert "import json" not in source and "import os" not in source  # unused standard-library imports go
    assert "import numpy as np" in source  # third-party imports may have side effects: they stay
    assert "assert x >= 0" in source and "z = 2" in source and "z = 3" not in source and "y = 1" in source
    assert "if probe() and args.foo_enabled:" in source  # a call before the constant operand still runs
    assert result.removed_settings == {"FOO_SIZE": "5"}  # read only by removed code; MODE is kept for the check
    assert {(f.source, f.value) for f in result.folded} >= {("args.foo_enabled", False), ("args.mode == 'a'", True)}
    assert "'N': Setting(2)" in source and "'MODE': Setting('a')" in source


def test_dce_keeps_the_settings_checks_that_read_a_value_before_the_class_rewrites_it(tmp_path):
    """baseline.env sets WARMDOWN_ITERS, so the settings class rewrites WARMDOWN_FRACTION to 0 after checking that
    it was not also set; folding that check with the rewritten 0 would let the extract take both silently."""
    raw = trainrun.read_env_file(REPO_ROOT_FOR_TESTS / "configs" / "baseline.env")
    args = train_gpt.Hyperparameters(raw)
    result = build_submission.dead_code_eliminate(SOURCE, {n: getattr(args, n.lower()) for n in SETTINGS}, raw)
    path = tmp_path / "train_gpt.py"
    path.write_text(result.source)
    module = build_submission.load_module(path, "baseline_extract")
    module.Hyperparameters(raw)
    for hyper in (train_gpt.Hyperparameters, module.Hyperparameters):
        with pytest.raises(ValueError, match="both set the warm-down"):
            hyper({**raw, "WARMDOWN_FRACTION": "0.3"})


def test_an_env_file_name_the_trainer_does_not_read_is_refused_and_design_names_become_ours(tmp_path):
    config = tmp_path / "typo.env"
    config.write_text("NUM_LAYERS=2\nGRAD_ACCUM_STEPS=2\nMODEL_DIMS=64\n")
    with pytest.raises(ValueError, match=r"sets GRAD_ACCUM_STEPS, MODEL_DIMS \(did you mean MODEL_DIM\?\)"):
        build_submission.extract(config, tmp_path / "out", dce=True, minified=False, compressed=False, log=lambda line: None)
    assert not (tmp_path / "out").exists()
    alias, ours = next(iter(train_gpt.Hyperparameters.DESIGN_ALIASES.items()))
    resolved = build_submission.config_settings(train_gpt, {"NUM_LAYERS": "2", alias: "1", "OMP_NUM_THREADS": "2"}, config)
    assert resolved == {"NUM_LAYERS": "2", ours: "1", "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def competition_extract(tmp_path_factory):
    """configs/skc_competition.env through --dce: (raw config, DceResult, the extracted module)."""
    raw = trainrun.read_env_file(REPO_ROOT_FOR_TESTS / "configs" / "skc_competition.env")
    args = train_gpt.Hyperparameters(raw)
    result = build_submission.dead_code_eliminate(SOURCE, {n: getattr(args, n.lower()) for n in SETTINGS}, raw)
    path = tmp_path_factory.mktemp("dce") / "train_gpt.py"
    path.write_text(result.source)
    return raw, result, build_submission.load_module(path, "competition_extract")


def test_dce_removes_every_feature_the_competition_config_leaves_off(competition_extract):
    raw, result, _ = competition_extract
    for name in ("EvalEngram", "ttt_train_on_chunk", "WeightEMA", "calibrate_ternary", "RotatedTernaryLinear",
                 "EngramHash", "TernaryMoE", "router_health_lines", "SmearGate", "exclude_self_value", "value_residual",
                 "ln_scale_factor", "SKCMixer", "causal_depthwise_conv", "CapsuleBank", "capsule_decode",
                 "KoopmanDynamics", "feedback_passes", "document_scan", "skc_layers", "recurrence_band",
                 "CapsuleCarry"):
        assert name in result.removed_definitions and f"class {name}" not in result.source
        assert f"def {name}" not in result.source and f"{name}(" not in result.source
    assert "TTT_LR" in result.removed_settings and "EVAL_ENGRAM_ALPHA" in result.removed_settings
    mine = ("turbo_quant", "ema", "calibration", "temperature_fit", "int8_zlib", "eval_engram", "ttt",
            "xsa", "vrl", "engram_hash", "moe", "smear_gate", "ln_scale_damping",
            "skc_mixer", "capsules", "capsule_carry", "koopman", "feedback_passes")
    assert not [line for line in result.features if "BUT KEPT" in line and line.split()[1] in mine], result.features


def test_extracted_file_refuses_settings_it_cannot_honour(competition_extract):
    raw, _, module = competition_extract
    module.Hyperparameters(raw)  # its own config, removed settings included, is accepted
    module.Hyperparameters({"SLIDING_EVAL_STRIDE": "32"})  # keeps the folded branch
    with pytest.raises(module.ConfigError, match=r"extracted with `args.ttt_enabled` False"):
        module.Hyperparameters({"TTT_ENABLED": "1"})
    with pytest.raises(module.ConfigError, match=r"extracted with `args.sliding_eval_stride` True"):
        module.Hyperparameters({"SLIDING_EVAL_STRIDE": "0"})
    with pytest.raises(module.ConfigError, match=r"TTT_LR='0.5': this file was extracted with TTT_LR='0.002'"):
        module.Hyperparameters({"TTT_LR": "0.5"})


def test_competition_extract_stays_within_the_official_script_size(competition_extract):
    """A soft budget: the official train_gpt.py keeps under 1,500 lines. The full research trainer may grow past
    that (features that are off cost nothing once extracted); the competition path, --dce extracted and counted
    without comments and docstrings, should stay within it. Over 1,500 lines the test warns with the largest
    sections of train_gpt.py; over 2,500 it fails."""
    _, result, _ = competition_extract
    lines = build_submission.code_lines(result.source)
    message = (f"the --dce competition extract has {lines} code lines (budget 1,500); largest sections of "
               f"train_gpt.py: {', '.join(build_submission.largest_sections(SOURCE)[:4])}")
    if lines > 1500:
        warnings.warn(message)
    assert lines <= 2500, message


def test_minify_keeps_asserts_and_module_names():
    minified = build_submission.minify("from typing import NamedTuple\n\n\nclass P(NamedTuple):\n    size: int\n\n\n"
                                       "def check_size(value):\n    '''doc'''\n    assert value > 0, 'positive'\n"
                                       "    return P(value)\n")
    namespace = {}
    exec(minified, namespace)
    assert namespace["check_size"](3).size == 3 and "doc" not in minified
    with pytest.raises(AssertionError):
        namespace["check_size"](0)


def test_compressed_code_runs_counts_its_own_bytes_and_keeps_source_inspection(tmp_path):
    source = ("import inspect, os, sys\n\n\ndef answer():\n    return 42\n\n\n"
              "if __name__ == '__main__':\n    print(answer(), os.path.getsize(__file__), inspect.getsource(answer).split()[1])\n")
    wrapper = build_submission.compress_code(source)
    path = tmp_path / "train_gpt.py"
    path.write_text(wrapper)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["42", str(len(wrapper.encode())), "answer():"]
    assert build_submission.code_source(path) == source


def test_equivalence_check_catches_a_broken_extraction(tmp_path):
    broken = SOURCE.replace("nn.init.normal_(self.tok_emb.weight, std=std)", "nn.init.normal_(self.tok_emb.weight, std=2 * std)")
    assert broken != SOURCE
    (tmp_path / "broken.py").write_text(broken)
    raw = trainrun.read_env_file(REPO_ROOT_FOR_TESTS / "configs" / "skc_competition.env")
    with pytest.raises(build_submission.EquivalenceError, match=r"(?s)first diverging line.*full trainer: step:1\S* train_loss"):
        build_submission.equivalence_check(REPO_ROOT_FOR_TESTS / "train_gpt.py", tmp_path / "broken.py", raw,
                                           tmp_path / "work", steps=3)


def test_extract_writes_an_equivalent_compressed_file(tmp_path):
    report = build_submission.extract(REPO_ROOT_FOR_TESTS / "configs" / "cpu_proxy.env", tmp_path / "out", dce=True,
                                      minified=True, compressed=True, steps=3, log=lambda line: None)
    sizes = report["sizes"]
    assert sizes["full"] > sizes["dce"] > sizes["minify"] > sizes["compress_code"] == sizes["shipped"]
    assert (tmp_path / "out" / "train_gpt.py").stat().st_size == sizes["shipped"]
    assert (tmp_path / "out" / "cpu_proxy.env").is_file() and report["equivalence"].startswith("equivalent")


# ----------------------------------------------------------------------------- finalize and check (synthetic logs)

def run_log(seed, val_bpb, code_bytes, model_bytes=1_000_000, train_ms=590_000, eval_ms=100_000, post_ms=None):
    """A finished log in the trainer's format."""
    lines = [f"config SEED={seed}", "config NUM_LAYERS=2", "config MODEL_DIM=64", "python:3.11 torch:2.13.0 numpy:1",
             "platform:Linux cpu_count:2 world_size:1 device:cpu",
             f"step:10/10 train_loss:3.0000 lr_scale:1.000 tok_s:1 train_time:{train_ms}ms step_avg:{train_ms / 10:.2f}ms remaining:0s",
             f"train_done steps:10 train_time:{train_ms}ms tok_s:1"]
    if post_ms is not None:
        lines.append(f"post_training_time:{post_ms}ms total_training_time:{train_ms + post_ms}ms of MAX_WALLCLOCK_SECONDS=600")
    lines += [f"artifact code_bytes:{code_bytes} model_bytes:{model_bytes} total_bytes:{code_bytes + model_bytes} "
              "cap_bytes:16000000 headroom_bytes:1 margin_bytes:0",
              f"final_ternary_brotli_roundtrip val_loss:{val_bpb * 1.5:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_ms}ms",
              f"final_ternary_brotli_roundtrip_exact val_loss:{val_bpb * 1.5:.8f} val_bpb:{val_bpb:.8f}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def records_folder(tmp_path):
    folder = tmp_path / "2026-11-29_Test"
    folder.mkdir()
    (folder / "train_gpt.py").write_text("print('a shipped trainer')\n")
    code = (folder / "train_gpt.py").stat().st_size
    logs = []
    for seed, bpb in ((1, 1.5), (2, 1.52), (3, 1.49)):
        logs.append(tmp_path / f"run{seed}.txt")
        logs[-1].write_text(run_log(seed, bpb, code))
    submission = build_submission.finalize(folder, logs, "non_record_16mb", "Test", "someone", "someone", None)
    return folder, submission


def failed(folder):
    return {f.what: f.detail for f in build_submission.check_folder(folder, legality=False, log=lambda line: None) if not f.ok}


def test_finalize_writes_the_official_fields_from_the_logs(records_folder):
    folder, submission = records_folder
    assert submission["val_bpb"] == pytest.approx((1.5 + 1.52 + 1.49) / 3, abs=1e-8)
    assert submission["bytes_code"] == (folder / "train_gpt.py").stat().st_size
    assert submission["bytes_total"] == submission["bytes_code"] + 1_000_000
    assert [s["seed"] for s in submission["seeds"]] == [1, 2, 3]
    readme = (folder / "README.md").read_text()
    assert "± " in readme and "| 2 | " in readme and "CPU smoke record" in readme
    assert sorted(p.name for p in folder.glob("train_seed*.log")) == ["train_seed1.log", "train_seed2.log", "train_seed3.log"]
    assert failed(folder) == {}


def test_finalize_refuses_logs_from_another_file(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "train_gpt.py").write_text("x = 1\n")
    (tmp_path / "run.txt").write_text(run_log(1, 1.5, code_bytes=999))
    with pytest.raises(build_submission.SubmissionError, match="counted 999 code bytes"):
        build_submission.finalize(folder, [tmp_path / "run.txt"], "non_record_16mb", "n", "a", "g", None)


def test_check_fails_a_folder_over_the_cap(records_folder):
    folder, _ = records_folder
    with open(folder / "train_gpt.py", "a") as f:
        f.write("#" * 15_000_000 + "\n")
    found = failed(folder)
    assert "> 16,000,000" in found["size cap"] and "the logs did not come from this file" in found["code bytes"]


def test_check_fails_claims_the_logs_do_not_support(records_folder):
    folder, _ = records_folder
    submission = json.loads((folder / "submission.json").read_text())
    submission["val_bpb"] = 1.4
    del submission["github_id"]
    (folder / "submission.json").write_text(json.dumps(submission))
    (folder / "train_seed3.log").write_text(run_log(1, 1.49, (folder / "train_gpt.py").stat().st_size, train_ms=700_000))
    found = failed(folder)
    assert "val_bpb claims 1.4" in found["claims vs logs"] and "github_id" in found["submission.json fields"]
    assert found["seeds"] == "[1, 2, 1]" and "training time train_seed3.log" not in found  # the non-record track
    submission["track"] = "10min_16mb"
    (folder / "submission.json").write_text(json.dumps(submission))
    assert "700.0 s" in failed(folder)["training time train_seed3.log"]


def test_check_fails_what_it_cannot_verify(records_folder):
    folder, _ = records_folder
    code_bytes = (folder / "train_gpt.py").stat().st_size
    (folder / "train_seed3.log").write_text(run_log(3, 1.49, code_bytes).replace(f"artifact code_bytes:{code_bytes} ", "artifact "))
    (folder / "helpers.py").write_text("x = 1\n")
    (folder / "extraction.json").write_text(json.dumps({"config": "a.env", "shipped_sha256": "0" * 64}))
    found = failed(folder)
    assert "train_seed3.log: no code bytes" in found["code bytes"] and "report no model bytes" in found["size cap"]
    assert "helpers.py" in found["code files"] and "extract again" in found["extraction record"]


def test_finalize_refuses_a_stale_extraction_record_and_an_ambiguous_config(records_folder, tmp_path):
    folder, _ = records_folder
    logs = sorted(folder.glob("train_seed*.log"))
    final = lambda: build_submission.finalize(folder, logs, "non_record_16mb", "n", "a", "g", None)
    (folder / "a.env").write_text("NUM_LAYERS=2\n")
    (folder / "b.env").write_text("NUM_LAYERS=3\n")
    with pytest.raises(build_submission.SubmissionError, match="several env files"):
        final()
    sha = build_submission.hashlib.sha256((folder / "train_gpt.py").read_bytes()).hexdigest()
    (folder / "extraction.json").write_text(json.dumps({"config": "b.env", "shipped_sha256": sha}))
    final()
    assert "`b.env`" in (folder / "README.md").read_text()
    (folder / "train_gpt.py").write_text("print('a shipped trainex')\n")  # same size, other code
    with pytest.raises(build_submission.SubmissionError, match="does not describe"):
        final()


def test_legality_suite_passes_the_extract_and_catches_a_non_causal_edit(competition_extract, tmp_path):
    raw, result, _ = competition_extract
    (tmp_path / "extract.py").write_text(result.source)
    (tmp_path / "noncausal.py").write_text(result.source.replace("is_causal=True", "is_causal=False"))
    findings = build_submission.legality_suite(tmp_path / "extract.py", raw, tmp_path / "ok")
    assert findings and all(ok for ok, _, _ in findings), findings
    findings = build_submission.legality_suite(tmp_path / "noncausal.py", raw, tmp_path / "bad")
    failures = [what for ok, what, _ in findings if not ok]
    assert failures and all(what.startswith("causality") for what in failures), findings
