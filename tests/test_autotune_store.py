"""The launch-config store (docs/design.md §7): lookup order, bad files, logging, launch fallback, CLI."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("triton")
from laser_triton.kernels import _common, configs  # noqa: E402
from laser_triton.kernels.configs import DEFAULTS, ConfigStore, config_key, n_bucket  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from laser_triton.tools import autotune  # noqa: E402

GPU = "NVIDIA H200"
FILE = "NVIDIA_H200.json"


def _write(d, kernels, version="3.6.0", name=FILE):
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({"triton_version": version, "kernels": kernels}))


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "env", tmp_path / "shipped"


def _store(dirs, **kw):
    env, shipped = dirs
    shipped.mkdir(parents=True, exist_ok=True)
    return ConfigStore(GPU, env_dir=env, shipped_dir=shipped, **kw)


def test_names_and_keys():
    assert configs.sanitize_gpu_name("NVIDIA H200") == "NVIDIA_H200"
    assert configs.sanitize_gpu_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"
    assert config_key(512, 64, "bf16") == "D=512,r=64,dtype=bf16"
    assert config_key(512, 64, "bf16", 65536) == "D=512,r=64,dtype=bf16,N=65536"
    assert [n_bucket(n) for n in (1, 1000, 5000, 65536, 70000, 10**9)] == [
        1024, 1024, 16384, 65536, 262144, 1 << 20]


def test_missing_files_give_builtin_defaults(dirs, caplog):
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        cfg = _store(dirs).lookup("compress_coeff", 512, 64, "bf16", 65536)
    assert cfg == DEFAULTS["compress_coeff"]
    assert "using built-in defaults" in caplog.text


def test_corrupt_json_is_ignored_with_a_warning(dirs, caplog):
    env, _ = dirs
    env.mkdir(parents=True)
    (env / FILE).write_text("{not json")
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        cfg = _store(dirs).lookup("reconstruct", 512, 8, "bf16")
    assert cfg == DEFAULTS["reconstruct"]
    assert "ignoring config file" in caplog.text and "JSONDecodeError" in caplog.text


def test_foreign_triton_version_is_used_and_logged(dirs, caplog):
    env, _ = dirs
    _write(env, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 128}}}, version="2.9.9")
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        cfg = _store(dirs).lookup("reconstruct", 512, 8, "bf16")
    assert cfg["BLOCK_N"] == 128 and cfg["BLOCK_D"] == DEFAULTS["reconstruct"]["BLOCK_D"]
    assert "written with Triton 2.9.9" in caplog.text


def test_env_dir_overrides_shipped_file(dirs, monkeypatch):
    env, shipped = dirs
    _write(shipped, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 128},
                                     "D=1024,r=8,dtype=bf16": {"BLOCK_N": 32}}})
    _write(env, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 16}}})
    store = _store(dirs)
    assert store.lookup("reconstruct", 512, 8, "bf16")["BLOCK_N"] == 16
    assert store.lookup("reconstruct", 1024, 8, "bf16")["BLOCK_N"] == 32  # exact in shipped
    # get_store reads LASER_TRITON_CONFIG_DIR (the interpreter store reads only that dir).
    name = configs.sanitize_gpu_name(configs.gpu_name(torch.device("cpu"))) + ".json"
    _write(env, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 16}}}, name=name)
    monkeypatch.setenv("LASER_TRITON_CONFIG_DIR", str(env))
    monkeypatch.setattr(configs, "_STORES", {})
    assert configs.get_store(torch.device("cpu")).lookup("reconstruct", 512, 8, "bf16")[
        "BLOCK_N"] == 16


def test_nearest_entry_same_dtype(dirs, caplog):
    env, _ = dirs
    _write(env, {"compress_coeff": {
        "D=512,r=16,dtype=bf16": {"BLOCK_N": 16},
        "D=4096,r=128,dtype=bf16": {"BLOCK_N": 128},
        "D=600,r=20,dtype=fp32": {"BLOCK_N": 64},
        "garbage-key": {"BLOCK_N": 32},
    }})
    store = _store(dirs)
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        assert store.lookup("compress_coeff", 600, 16, "bf16")["BLOCK_N"] == 16
    assert store.lookup("compress_coeff", 3000, 112, "bf16")["BLOCK_N"] == 128
    assert store.lookup("compress_coeff", 600, 20, "fp32")["BLOCK_N"] == 64  # exact
    # a rank not divisible by 16 is another binary: it never borrows a multiple's config
    assert store.lookup("compress_coeff", 600, 20, "bf16") == DEFAULTS["compress_coeff"]
    assert "using nearest configs" in caplog.text
    # Path choices are never borrowed from another shape.
    _write(env, {configs.PATH_TABLE: {"D=512,r=16,dtype=bf16": "split"}})
    store = _store(dirs)
    assert store.lookup(configs.PATH_TABLE, 512, 16, "bf16") == "split"
    assert store.lookup(configs.PATH_TABLE, 600, 16, "bf16") is None


def test_row_bucket_preferred_never_raw_rows(dirs):
    env, _ = dirs
    _write(env, {"compress_y": {"D=512,r=64,dtype=bf16": {"BLOCK_N": 32},
                                "D=512,r=64,dtype=bf16,N=65536": {"BLOCK_N": 64}}})
    store = _store(dirs)
    assert store.lookup("compress_y", 512, 64, "bf16", 50_000)["BLOCK_N"] == 64
    assert store.lookup("compress_y", 512, 64, "bf16", 500)["BLOCK_N"] == 32
    assert store.lookup("compress_y", 512, 64, "bf16")["BLOCK_N"] == 32


def test_malformed_entries_are_skipped(dirs, caplog):
    env, _ = dirs
    _write(env, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 48},
                                 "D=512,r=16,dtype=bf16": {"num_warps": 3},
                                 "D=512,r=32,dtype=bf16": {"SURPRISE": 1},
                                 "D=512,r=64,dtype=bf16": {"BLOCK_N": 64}},
                 "no_such_kernel": {"D=512,r=8,dtype=bf16": {}}})
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        cfg = _store(dirs).lookup("reconstruct", 512, 8, "bf16")
    assert cfg["BLOCK_N"] == 64  # nearest well-formed entry
    assert "is not a power of two" in caplog.text
    assert configs.validate_entry("reconstruct", {"num_warps": 3}) == "num_warps=3"
    assert configs.validate_entry("compress_path", "fused") is None


def test_log_once_per_kernel_and_source(dirs, caplog):
    env, _ = dirs
    _write(env, {"reconstruct": {"D=512,r=8,dtype=bf16": {"BLOCK_N": 128}}})
    store = _store(dirs)
    with caplog.at_level(logging.INFO, logger="laser_triton"):
        for D in (512, 513, 700, 900):
            store.lookup("reconstruct", D, 8, "bf16")
            store.lookup("reconstruct", D, 8, "bf16")  # cached
    assert caplog.text.count("reconstruct: using nearest") == 1
    assert caplog.text.count("reconstruct: using exact") == 1


def test_shipped_default_file_is_the_safe_default():
    """Without a file for this GPU, the shipped default.json (read as package data)."""
    store = ConfigStore("Some Future GPU")
    assert store.fallback and "default.json" in store.fallback[0][0]
    assert not store.tuned
    cfg = store.lookup("compress_coeff", 512, 64, "bf16", 65536)
    assert cfg == {**DEFAULTS["compress_coeff"], **cfg}


def test_launch_falls_back_on_out_of_resources(caplog):
    ran = []

    def run(cfg):
        ran.append(dict(cfg))
        if cfg["BLOCK_N"] > 32:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return "done"

    start = {"BLOCK_N": 128, "BLOCK_D": 64, "num_stages": 2}
    with caplog.at_level(logging.WARNING, logger="laser_triton"):
        cfg, out = _common.launch("k", run, start,
                                  lambda c: _common.shrink_config(c, ("BLOCK_N", "BLOCK_D")))
    assert out == "done" and cfg == {"BLOCK_N": 32, "BLOCK_D": 64, "num_stages": 1}
    assert [c["BLOCK_N"] for c in ran] == [128, 128, 64, 32] and "does not fit" in caplog.text
    with pytest.raises(OutOfResources):
        _common.launch("k", run, start, None)


def test_cli_without_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    # A run that tunes nothing fails (it used to exit 0 having done nothing).
    assert autotune.cli_main(["--hidden", "512", "--rank", "8"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_prune_only_writes_untimed_file(tmp_path):
    rc = autotune.cli_main(["--prune-only", "--hidden", "256", "--rank", "16", "--out",
                            str(tmp_path), "--kernels", "reconstruct", "orth_factor",
                            "--coeff", "bf16", "fp32"])
    assert rc == 0
    doc = json.loads((tmp_path / "default.json").read_text())
    assert doc["timed"] is False and "never timed" in doc["note"]
    assert doc["kernels"]["reconstruct"]["D=256,r=16,dtype=bf16"] == DEFAULTS["reconstruct"]
    # reconstruct reads C: one entry per C dtype; orth_factor's binary does not depend on C
    assert doc["kernels"]["reconstruct"]["D=256,r=16,dtype=bf16,C=fp32"] == DEFAULTS["reconstruct"]
    assert list(doc["kernels"]["orth_factor"]) == ["D=256,r=16,dtype=fp32"]
    assert 0 < doc["shared_bytes"]["orth_factor"]["D=256,r=16,dtype=fp32"] <= 232_448
    store = ConfigStore(GPU, env_dir=tmp_path / "x", shipped_dir=tmp_path)  # reads it back
    assert store.lookup("reconstruct", 256, 16, "bf16") == DEFAULTS["reconstruct"]


def test_candidates_and_prune():
    cands = autotune.candidates("orth_factor")
    assert cands[0] == DEFAULTS["orth_factor"] and len(cands) == 3
    assert any(c["PRECISION"] == "bf16x3" for c in autotune.candidates("reconstruct", True))
    fit = autotune.prune("orth_factor", 512, 16, "fp32", cands[:1], limit=232_448)
    assert len(fit) == 1 and fit[0][1] <= 232_448
    assert autotune.prune("orth_factor", 512, 16, "fp32", cands[:1], limit=1) == []


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("kernel", ["compress_coeff", "orth_apply"])
def test_sweep_timing_plumbing(kernel, monkeypatch):
    """The GPU timing loop, run on CPU tensors with a fake timer: the later config is
    'faster', so it must win, and the launchers must have run with each candidate."""
    import triton.testing

    if torch.cuda.is_available():
        pytest.skip("exercised for real by the sweep on a GPU")
    if not _common.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    ticks = []

    def fake_bench(fn, warmup, rep):
        fn()
        ticks.append(1)
        return 1.0 / len(ticks)

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    device = torch.device("cpu")
    store = ConfigStore("cpu", interpreter=True)
    monkeypatch.setattr(configs, "_STORES", {configs.gpu_name(device): store})
    base = configs.INTERPRETER_DEFAULTS[kernel]
    other = {**base, "BLOCK_D": 64} if kernel == "orth_apply" else {**base, "BLOCK_N": 64}
    cfg, ms = autotune._time_kernel(store, kernel, 64, 8, "fp32", 100, [(base, 0), (other, 0)],
                                    {}, device)
    assert cfg == other and ms == 0.5 and len(ticks) == 2


def test_prune_compiles_every_mode_a_launcher_runs():
    """orth_apply at r = 16 with BLOCK_D = 32 fits in its default mode (REPAIR=True) but
    spills in the REPAIR=False variant every call also launches: the prune must reject it
    (it audited the default mode only and shipped that config), and keep BLOCK_D = 16."""
    base = {**DEFAULTS["orth_apply"], "num_warps": 4, "num_stages": 1}
    assert autotune.prune("orth_apply", 512, 16, "fp32", [{**base, "BLOCK_D": 32}]) == []
    fit = autotune.prune("orth_apply", 512, 16, "fp32", [{**base, "BLOCK_D": 16}])
    assert len(fit) == 1 and fit[0][0]["BLOCK_D"] == 16


# ----------------------------------------------------------------------------- C dtype keys


def test_configs_are_keyed_by_the_coefficient_dtype(dirs):
    """A launch storing (or reading) C as fp32 gets the entry proven with an fp32 C, never the
    bf16-C one (main@d9f8f3b: no C in the key; the launcher patched bf16-C configs), exact
    or nearest; a key without C is bf16 C (old files), and C-independent kernels ignore it."""
    env, _ = dirs
    assert config_key(512, 64, "bf16", None, "fp32") == "D=512,r=64,dtype=bf16,C=fp32"
    assert config_key(512, 64, "bf16", 65536, "bf16") == "D=512,r=64,dtype=bf16,N=65536"
    assert [k for k in ("compress_fused", "compress_coeff", "compress_y", "reconstruct",
                        "grad_coeff", "orth_gram") if configs.keyed_on_coeff(k)] == [
        "compress_fused", "compress_coeff", "reconstruct"]
    _write(env, {"compress_coeff": {"D=512,r=128,dtype=bf16": {"BLOCK_N": 256, "num_warps": 16},
                                    "D=512,r=128,dtype=bf16,C=fp32": {"BLOCK_N": 64},
                                    "D=512,r=128,dtype=bf16,C=fp16,N=131072": {"BLOCK_N": 32}},
                 "reconstruct": {"D=512,r=8,dtype=bf16,C=bf16": {"BLOCK_N": 16}},
                 "compress_y": {"D=512,r=128,dtype=bf16": {"BLOCK_N": 128}}})
    store = _store(dirs)
    assert store.lookup("compress_coeff", 512, 128, "bf16", 87_000)["BLOCK_N"] == 256
    assert store.lookup("compress_coeff", 512, 128, "bf16", 87_000, "fp32")["BLOCK_N"] == 64
    assert store.lookup("compress_coeff", 512, 128, "bf16", 87_000, "fp16")["BLOCK_N"] == 32
    # nearest: same X dtype and same C dtype only
    assert store.lookup("compress_coeff", 1024, 128, "bf16", None, "fp32")["BLOCK_N"] == 64
    assert store.lookup("compress_coeff", 1024, 128, "bf16")["BLOCK_N"] == 256
    assert store.lookup("reconstruct", 512, 8, "bf16")["BLOCK_N"] == 16  # C=bf16 == no C
    assert store.lookup("reconstruct", 512, 8, "bf16", None, "fp32") == DEFAULTS["reconstruct"]
    assert store.lookup("compress_y", 512, 128, "bf16", None, "fp32")["BLOCK_N"] == 128
    # what ran after a fallback is remembered per C dtype
    store.remember("compress_coeff", 512, 128, "bf16", 87_000, {"BLOCK_N": 16}, "fp32")
    assert store.lookup("compress_coeff", 512, 128, "bf16", 87_000, "fp32") == {"BLOCK_N": 16}
    assert store.lookup("compress_coeff", 512, 128, "bf16", 87_000)["BLOCK_N"] == 256


def test_a_path_choice_for_bf16_c_holds_for_other_c_unless_overridden(dirs):
    env, _ = dirs
    _write(env, {configs.PATH_TABLE: {"D=512,r=16,dtype=fp16": "split",
                                      "D=512,r=32,dtype=fp16,C=fp32": "fused"}})
    store = _store(dirs)
    assert store.lookup(configs.PATH_TABLE, 512, 16, "fp16", coeff="fp32") == "split"
    assert store.lookup(configs.PATH_TABLE, 512, 32, "fp16", coeff="fp32") == "fused"
    assert store.lookup(configs.PATH_TABLE, 512, 32, "fp16") is None


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
def test_launchers_launch_the_entry_for_their_coeff_dtype(dirs, monkeypatch):
    """compress_pass (C stored as coeff_dtype) and reconstruct (C read as given) launch the
    store's entry for that C dtype (run under the interpreter, results checked)."""
    import importlib

    if not _common.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    cp = importlib.import_module("laser_triton.kernels.compress_pass")
    rec = importlib.import_module("laser_triton.kernels.reconstruct")
    env, _ = dirs
    _write(env, {"compress_fused": {"D=48,r=16,dtype=fp32": {"BLOCK_N": 64, "BLOCK_K": 64},
                                    "D=48,r=16,dtype=fp32,C=fp16": {"BLOCK_N": 32, "BLOCK_K": 16}},
                 "reconstruct": {"D=48,r=16,dtype=fp32": {"BLOCK_N": 64},
                                 "D=48,r=16,dtype=fp32,C=fp16": {"BLOCK_N": 16}}})
    store = _store(dirs)  # a GPU store (files read), launched under the interpreter
    launched = []

    def spy(name, run, cfg, shrink):
        launched.append((name, cfg["BLOCK_N"]))
        return _common.launch(name, run, cfg, shrink)

    for mod in (cp, rec):
        monkeypatch.setattr(mod, "get_store", lambda device: store)
        monkeypatch.setattr(mod, "launch", spy)
    g = torch.Generator().manual_seed(12)
    X = torch.randn(100, 48, generator=g)
    U = torch.linalg.qr(torch.randn(48, 16, generator=g, dtype=torch.float64))[0]
    for coeff, rows in ((torch.float16, 32), (torch.bfloat16, 64)):
        launched.clear()
        out = cp.compress_pass(X, U.float(), True, coeff)
        assert launched == [("compress_fused", rows)]
        ref = X.double() @ U
        assert (out.C.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
        launched.clear()
        Xh = rec.reconstruct(out.C, U.float(), torch.float32)
        assert launched == [("reconstruct", 64 if coeff == torch.bfloat16 else 16)]
        want = out.C.double() @ U.t()
        assert (Xh.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_rank_takes_its_specialization_class_entry(dirs):
    """r = 97 and r = 127 compile to one binary (padded width 128, not divisible by 16), r = 96
    and 128 to another (main@8273088 gave r = 97 the r = 128 entry: on sm_90 its 256 x 16-warp
    compress_coeff config spilled at r = 127). A padded rank's design holds for its class."""
    env, _ = dirs
    assert configs.rank_class(97) == configs.rank_class(127) != configs.rank_class(128)
    assert configs.rank_class(8) == configs.rank_class(15) != configs.rank_class(1)
    assert [configs.rank_representative(r) for r in (1, 5, 15, 17, 31, 48, 97, 128)] == [
        1, 8, 8, 31, 31, 64, 127, 128]
    _write(env, {"compress_coeff": {"D=512,r=128,dtype=bf16": {"BLOCK_N": 256},
                                    "D=512,r=127,dtype=bf16": {"BLOCK_N": 64}},
                 configs.PATH_TABLE: {"D=512,r=64,dtype=bf16": "tma"}})
    store = _store(dirs)
    assert store.lookup("compress_coeff", 512, 97, "bf16", 87_000)["BLOCK_N"] == 64
    assert store.lookup("compress_coeff", 512, 96, "bf16", 87_000)["BLOCK_N"] == 256
    assert store.lookup("compress_coeff", 1536, 100, "bf16")["BLOCK_N"] == 64  # nearest, class
    assert store.lookup(configs.PATH_TABLE, 512, 40, "bf16") == "tma"
    assert store.lookup(configs.PATH_TABLE, 512, 40, "bf16", coeff="fp32") == "tma"
    assert store.lookup(configs.PATH_TABLE, 512, 32, "bf16") is None

