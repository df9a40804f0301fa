"""The TRM: preset sizes, recursion and saving, mlp_t, the attention Function, deep supervision,
losses, and LASER inside the model."""

from __future__ import annotations

import pytest
import torch
from helpers import sudoku_batch, trm_steps

import laser_triton as lt
from laser_triton.trm import TRM, TRMConfig, act_loss
from laser_triton.trm.attention import attention_core, attention_reference
from laser_triton.trm.config import preset_widths, swiglu_width
from laser_triton.trm.layers import Block, RotaryEmbedding, rms_norm, trunc_normal_
from laser_triton.trm.losses import log_stablemax, stablemax_cross_entropy
from laser_triton.trm.savecount import SavedTensorCounter


def small(**kw) -> TRMConfig:
    """A fast mlp_t model with the paper's structure (puzzle prefix, T cycles, n latent steps)."""
    base = dict(hidden_size=32, num_heads=2, expansion=2.0, mlp_t=True, pos_encodings="none",
                H_cycles=3, L_cycles=2, halt_max_steps=3)
    base.update(kw)
    return TRMConfig(**base)


batch = sudoku_batch


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- presets ---------------------------------------------------------------------------------
def test_preset_parameter_counts():
    sudoku = TRM(TRMConfig.paper_sudoku())
    # 2 x (mlp_t 97->1024->97: 148,992 + mlp 512->3072->512: 2,359,296)
    assert n_params(sudoku.net) == 5_016_576
    # + token embedding 11x512, lm head 512x11, Q head 512x2+2: the reference's 5,028,866;
    # + the 512-wide puzzle embedding, a buffer in the reference and a Parameter here.
    assert n_params(sudoku) == 5_028_866 + 512
    att = TRM(TRMConfig.paper_sudoku_att())
    assert n_params(att.net) == 6_815_744
    assert round(n_params(att) / 1e6, 1) == 6.8
    maze = TRMConfig.paper_maze()
    assert maze.total_len == 916 and maze.L_cycles == 4 and maze.H_cycles == 3
    assert n_params(TRM(maze).net) == 6_815_744


def test_preset_shapes_follow_the_reference():
    cfg = TRMConfig.paper_sudoku()
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers) == (512, 8, 2)
    assert (cfg.H_cycles, cfg.L_cycles, cfg.halt_max_steps) == (3, 6, 16)
    assert cfg.total_len == 97 and cfg.puzzle_emb_len == 16
    assert cfg.mlp_width == 1536 and cfg.token_mlp_width == 512
    assert swiglu_width(512, 4) == 1536 and swiglu_width(97, 4) == 512
    assert cfg.halt_exploration_prob == 0.1 and cfg.rms_norm_eps == 1e-5
    assert TRMConfig.paper_sudoku_att().pos_encodings == "rope"
    assert cfg.resolve_dtype("cpu") == torch.float32
    assert cfg.resolve_dtype("cuda") == torch.bfloat16
    # saved row widths: hidden, SwiGLU inner and gate/up, mlp_t positions, inner, gate/up
    assert cfg.saved_widths() == (97, 512, 1024, 1536, 3072)
    assert TRMConfig.paper_maze().saved_widths() == (512, 1536, 3072)  # qkv: 3 x 512
    assert TRMConfig.tiny().saved_widths() == (97, 128, 256, 512)
    assert preset_widths(128) == (128, 256, 512, 1024, 1536, 3072)
    with pytest.raises(ValueError):
        TRMConfig(mlp_t=True, pos_encodings="rope")
    with pytest.raises(ValueError):
        TRMConfig.preset("nope")


def test_initialization():
    torch.manual_seed(0)
    m = TRM(TRMConfig.paper_sudoku())
    assert torch.all(m.q_head.weight == 0) and torch.all(m.q_head.bias == -5)
    assert torch.all(m.puzzle_emb.weight == 0)
    assert "y_init" in dict(m.named_buffers()) and not any("init" in n for n, _ in m.named_parameters())
    w = m.net.blocks[0].mlp.gate_up_proj.weight  # truncated LeCun normal: std 1/sqrt(fan_in)
    assert abs(w.std().item() * 512 ** 0.5 - 1) < 0.01
    assert w.abs().max().item() <= 2 / 512 ** 0.5 * 1.2
    assert m.net.blocks[0].mlp.gate_up_proj.bias is None
    t = trunc_normal_(torch.empty(200_000), std=2.0)
    assert abs(t.std().item() - 2.0) < 0.02 and t.abs().max() <= 2 * 2.0 * 1.14


# -- recursion and what it saves ---------------------------------------------------------------
def _saves(cfg: TRMConfig, counter: SavedTensorCounter | None = None) -> int:
    """Tensors saved during one training supervision step (forward only)."""
    torch.manual_seed(0)
    model = TRM(cfg, laser=counter)
    if counter is not None:
        counter.watch(model.net)
    b = batch()
    return _count_saves(lambda: model(model.initial_carry(b), b))


def _count_saves(run) -> int:
    """Tensors autograd saves while run() executes."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return count


def test_only_the_last_cycle_saves_tensors():
    total_1 = _saves(small(H_cycles=1))
    total_3 = _saves(small(H_cycles=3))
    assert total_1 == total_3  # the first T-1 cycles under no_grad save nothing
    counter = SavedTensorCounter()
    outer = _saves(small(H_cycles=3), counter)
    n = small().L_cycles
    per_call = _saves_per_call()
    assert counter.total_saves == (n + 1) * per_call  # the grad cycle: n + 1 network calls
    # The counter's hooks are innermost inside compress(); outside it: embedding and heads.
    assert outer + counter.total_saves == total_3 and outer < per_call
    roles = {name.split("/")[0] for name in counter.last}
    assert roles == {"z", "y"}


def _saves_per_call() -> int:
    cfg = small()
    net = TRM(cfg).net
    h = torch.randn(3, cfg.total_len, cfg.hidden_size, requires_grad=True)
    return _count_saves(lambda: net(h, h.detach()))


def test_recursion_structure_calls_the_network_T_times_n_plus_one():
    cfg = small(H_cycles=3, L_cycles=2)
    model = TRM(cfg)
    calls = []
    model.net.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    b = batch()
    model(model.initial_carry(b), b)
    assert len(calls) == 3 * (2 + 1)
    assert calls == [False] * 6 + [True] * 3


def test_mlp_t_normalizes_over_the_sequence_axis():
    cfg = small()
    block = Block(cfg)
    seen = {}
    block.mlp_t.register_forward_hook(lambda m, a, o: seen.setdefault("mlp_t_in", a[0]))
    block.mlp.register_forward_hook(lambda m, a, o: seen.setdefault("mlp_in", a[0]))
    h = torch.randn(4, cfg.total_len, cfg.hidden_size) * 3 + 1
    out = block(h)
    # The token-mixing SwiGLU reads (B, D, L): it mixes positions, inner width from L.
    assert seen["mlp_t_in"].shape == (4, cfg.hidden_size, cfg.total_len)
    assert block.mlp_t.gate_up_proj.weight.shape == (2 * cfg.token_mlp_width, cfg.total_len)
    # After its residual, RMSNorm ran over the sequence axis: unit RMS along L for each channel.
    mixed = seen["mlp_in"]
    rms_seq = mixed.square().mean(dim=1).sqrt()
    torch.testing.assert_close(rms_seq, torch.ones_like(rms_seq), atol=1e-4, rtol=0)
    assert (mixed.square().mean(dim=2).sqrt() - 1).abs().max() > 0.05
    # The channel MLP's norm is over features, as usual.
    rms_feat = out.square().mean(dim=-1).sqrt()
    torch.testing.assert_close(rms_feat, torch.ones_like(rms_feat), atol=1e-4, rtol=0)


def test_rms_norm_runs_in_fp32_and_keeps_dtype():
    x = (torch.randn(2, 5, 64) * 100).to(torch.bfloat16)
    y = rms_norm(x, 1e-5)
    assert y.dtype == torch.bfloat16
    ref = x.float() / x.float().square().mean(-1, keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(y, ref.to(torch.bfloat16))


# -- attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [True, False])
def test_attention_function_gradcheck(rope):
    torch.manual_seed(0)
    B, L, H, Dh = 2, 5, 2, 4
    qkv = torch.randn(B, L, 3 * H * Dh, dtype=torch.float64, requires_grad=True)
    cos_sin = None
    if rope:
        r = RotaryEmbedding(Dh, L, 10000.0)
        cos_sin = (r.cos.double(), r.sin.double())
    fn = lambda t: attention_core(t, H, cos_sin)
    assert torch.autograd.gradcheck(fn, (qkv,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck is not None
    g = torch.randn(B, L, H * Dh, dtype=torch.float64)
    (ours,) = torch.autograd.grad(fn(qkv), qkv, g)
    (ref,) = torch.autograd.grad(attention_reference(qkv, H, cos_sin), qkv, g)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_attention_saves_only_qkv_and_recomputes_outside_hooks():
    torch.manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 16, requires_grad=True)
    x = qkv * 1.0  # a non-leaf, like the projection output
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention_core(x, 2, None)
    assert len(saved) == 1 and saved[0].shape == x.shape
    assert saved[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()

    def refuse(t):  # an enclosing compressing hook must never see the recomputation
        raise AssertionError("recomputed attention internals reached the outer hook")

    with torch.autograd.graph.saved_tensors_hooks(refuse, lambda t: t):
        out.sum().backward()
    assert qkv.grad is not None


def test_attention_model_gradients_match_plain_autograd(monkeypatch):
    cfg = TRMConfig(hidden_size=32, num_heads=4, expansion=2.0, H_cycles=1, L_cycles=1,
                    seq_len=10, puzzle_emb_len=2, vocab_size=11, halt_max_steps=2)
    b = {"inputs": torch.randint(1, 11, (2, 10)), "labels": torch.randint(2, 11, (2, 10)),
         "puzzle_ids": torch.zeros(2, dtype=torch.long)}

    def grads():
        torch.manual_seed(0)
        m = TRM(cfg)
        c, out = m(m.initial_carry(b), b)
        act_loss(out["logits"], out["q_halt_logits"], c.data["labels"], c.halted, c.steps)[0].backward()
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ours = grads()
    import laser_triton.trm.layers as layers

    monkeypatch.setattr(layers, "attention_core", attention_reference)
    ref = grads()
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_attention_model_saves_one_tensor_per_attention_call():
    """Inside a TRM with attention, the self_attn module itself saves only the qkv projection
    (its Linear children save their inputs as usual): nothing of RoPE or SDPA."""
    cfg = TRMConfig(hidden_size=32, num_heads=4, expansion=2.0, H_cycles=2, L_cycles=2,
                    seq_len=10, puzzle_emb_len=2, vocab_size=11, halt_max_steps=2)
    counter = SavedTensorCounter()
    model = TRM(cfg, laser=counter)
    counter.watch(model.net)
    b = {"inputs": torch.randint(1, 11, (2, 10)), "labels": torch.randint(2, 11, (2, 10)),
         "puzzle_ids": torch.zeros(2, dtype=torch.long)}
    model(model.initial_carry(b), b)
    attn = {k: v for k, v in counter.last.items() if k.split("/")[1].split("#")[0].endswith("self_attn")}
    assert len(attn) == 2 * cfg.num_layers  # one site per block, for each of z and y
    assert all(v.saves == (cfg.L_cycles if k.startswith("z/") else 1) for k, v in attn.items())
    qkv_bytes = 2 * cfg.total_len * 3 * cfg.hidden_size * 4
    assert all(v.nbytes == v.saves * qkv_bytes for v in attn.values())


def test_sparse_signsgd_updates_only_touched_rows():
    from laser_triton.trm import PuzzleEmbedding, SparseSignSGD

    emb = PuzzleEmbedding(4, 3)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    opt = SparseSignSGD([emb], lr=0.1, weight_decay=0.5)
    out = emb(torch.tensor([1, 1, 3]), torch.float32)
    (out * torch.tensor([[1.0], [-3.0], [2.0]])).sum().backward()  # row 1: grad 1 - 3 < 0
    opt.step()
    w = emb.weight.detach()
    assert torch.equal(w[0], torch.ones(3)) and torch.equal(w[2], torch.ones(3))  # untouched
    torch.testing.assert_close(w[1], torch.full((3,), 1 * (1 - 0.05) + 0.1))
    torch.testing.assert_close(w[3], torch.full((3,), 1 * (1 - 0.05) - 0.1))


@pytest.mark.parametrize("mlp_t", [True, False])
def test_bf16_forward_keeps_fp32_parameters(mlp_t):
    """The GPU configuration (bf16 activations, fp32 weights cast at use), run on CPU."""
    cfg = small(forward_dtype="bfloat16", mlp_t=mlp_t, pos_encodings="none" if mlp_t else "rope")
    model = TRM(cfg)
    b = batch()
    carry, out = model(model.initial_carry(b), b)
    assert carry.y.dtype == torch.bfloat16 and out["logits"].dtype == torch.bfloat16
    assert out["q_halt_logits"].dtype == torch.float32
    loss, _ = act_loss(out["logits"], out["q_halt_logits"], carry.data["labels"], carry.halted,
                       carry.steps)
    loss.backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- deep supervision --------------------------------------------------------------------------
def test_deep_supervision_carry_and_halting():
    cfg = small(halt_max_steps=3, halt_exploration_prob=0.0)
    torch.manual_seed(0)
    model = TRM(cfg)
    b1, b2 = batch(4, seed=1), batch(4, seed=2)
    carry = model.initial_carry(b1)
    assert carry.halted.all()
    carry, _ = model(carry, b1)
    assert carry.steps.tolist() == [1, 1, 1, 1] and not carry.halted.any()  # Q starts at -5
    assert torch.equal(carry.data["inputs"], b1["inputs"])
    carry.halted[1] = True  # sample 1 halts: it takes new data and restarts
    carry, _ = model(carry, b2)
    assert carry.steps.tolist() == [2, 1, 2, 2]
    assert torch.equal(carry.data["inputs"][1], b2["inputs"][1])
    assert torch.equal(carry.data["inputs"][0], b1["inputs"][0])
    carry, _ = model(carry, b2)
    assert carry.halted.tolist() == [True, False, True, True]  # max steps reached
    # Evaluation runs every sample through all halt_max_steps steps.
    model.eval()
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)  # would halt at once in training
        c = model.initial_carry(b1)
        for step in range(cfg.halt_max_steps):
            c, _ = model(c, b1)
            assert c.halted.all() == (step == cfg.halt_max_steps - 1)


def test_halting_exploration_delays_some_halts():
    cfg = small(halt_max_steps=8, halt_exploration_prob=0.5, H_cycles=1, L_cycles=1)
    torch.manual_seed(0)
    model = TRM(cfg)
    with torch.no_grad():
        model.q_head.bias.fill_(5.0)  # Q says halt
    b = batch(64)
    gen = torch.Generator().manual_seed(0)
    carry, _ = model(model.initial_carry(b), b, generator=gen)
    frac = carry.halted.float().mean().item()
    assert 0.3 < frac < 0.8  # about half explore (and wait for a step >= 2)


# -- losses ---------------------------------------------------------------------------------------
def test_stablemax_cross_entropy():
    x = torch.tensor([[-2.0, 0.0, 3.0]])
    s = torch.tensor([[1 / 3, 1.0, 4.0]])
    torch.testing.assert_close(log_stablemax(x), (s / s.sum()).log())
    labels = torch.tensor([2])
    torch.testing.assert_close(stablemax_cross_entropy(x, labels),
                               -(s / s.sum()).log()[:, 2].double())
    assert stablemax_cross_entropy(x, torch.tensor([-100])).item() == 0
    assert stablemax_cross_entropy(x, labels).dtype == torch.float64


def test_act_loss_q_target_is_exact_correctness():
    logits = torch.full((2, 3, 4), -1.0)
    labels = torch.tensor([[1, 2, 3], [1, 2, 3]])
    logits[0, torch.arange(3), labels[0]] = 5.0  # sample 0 fully right
    logits[1, 0, 1] = 5.0  # sample 1 only one cell right
    q = torch.zeros(2, requires_grad=True)
    loss, m = act_loss(logits, q, labels, torch.tensor([True, True]), torch.tensor([4, 2]))
    loss.backward()
    assert q.grad[0] < 0 < q.grad[1]  # push Q up where exact, down where not
    assert m["exact_acc"].item() == 1 and m["count"].item() == 2
    assert abs(m["cell_acc"].item() - (1 + 1 / 3)) < 1e-6


# -- LASER inside the model ----------------------------------------------------------------------
def _laser_grads(laser_cfg: lt.LaserConfig | None, steps: int = 2):
    """Gradients of the tiny preset on a fixed batch after `steps` supervision steps."""
    cfg = TRMConfig.tiny().replace(L_cycles=2)
    torch.manual_seed(0)
    model = TRM(cfg)
    if laser_cfg is not None:
        model.laser = lt.Laser(laser_cfg)
        model.laser.watch(model.net)
    trm_steps(model, batch(4), steps)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


def test_laser_off_or_tau_zero_is_bit_identical():
    plain, _ = _laser_grads(None)
    zero, _ = _laser_grads(lt.LaserConfig(tau=0.0))
    for n in plain:
        assert torch.equal(plain[n], zero[n]), n


def test_laser_on_gives_close_gradients():
    plain, _ = _laser_grads(None)
    cfg = lt.LaserConfig(rank=16, max_rank=128, tau=0.05, coeff_dtype=torch.float32)
    lasered, model = _laser_grads(cfg)
    s = model.laser.summary()
    assert s["stored_bytes"] < 0.9 * s["raw_bytes"]  # something was actually compressed
    report = model.laser.report()
    assert report[report.width > 0].max_rel_err.max() <= 0.05 + 1e-6
    # The widths LASER compressed are the ones the kernel audit covers (preset_widths)
    compressed = set(report.width[report.width > 0])
    assert compressed == {w for w in TRMConfig.tiny().saved_widths() if w >= cfg.min_width}
    for n in plain:
        err = (lasered[n] - plain[n]).norm() / plain[n].norm().clamp_min(1e-12)
        assert err < 2 * 0.05, (n, float(err))  # about tau; the bound is loose on purpose
