"""Record/replay against a real server: replay engages, and every divergence stays correct."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rrto_lab


@pytest.fixture
def rrto(server_address):
    s = rrto_lab.connect(server_address, mode="rrto")
    s.activate()
    yield s
    s.close()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def run_loop(session, model, inputs, step=None):
    """Run model on each input offloaded; return the CPU outputs and the rows of each call."""
    outs, rows = [], []
    for i, x in enumerate(inputs):
        before = len(session.inferences)
        outs.append(step(model, x, i) if step else model(x.cuda()).cpu())
        rows.append(session.inferences[before:])
    return outs, rows


def offloaded_matches_local(session, local, inputs, forward):
    """Run ``forward`` on a remote copy of ``local`` for each input and check it equals the local
    run; return the telemetry rows of each call."""
    remote = copy.deepcopy(local).cuda()
    with torch.no_grad():
        outs, rows = run_loop(session, remote, inputs, lambda m, x, i: forward(m, x.cuda()).cpu())
        for got, x in zip(outs, inputs, strict=True):
            torch.testing.assert_close(got, forward(local, x), rtol=1e-5, atol=1e-6)
    return rows


def test_default_mode_is_rrto(server_address):
    s = rrto_lab.connect(server_address)
    assert s.mode == "rrto"
    s.close()


def test_replay_engages_for_a_static_model_and_matches_local(rrto):
    local = cnn()
    remote = copy.deepcopy(local).cuda()
    inputs = [torch.randn(4, 3, 16, 16) for _ in range(8)]
    with torch.no_grad():
        outs, rows = run_loop(rrto, remote, inputs)
        expect = [local(x) for x in inputs]
    for got, want in zip(outs, expect, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    phases = [r[-1]["phase"] for r in rows]
    assert phases[:2] == ["record", "record"] and phases[-3:] == ["replay"] * 3
    for r in rows[-3:]:  # steady state: one round trip per inference (its one sync point)
        assert len(r) == 1 and r[0]["rpcs"] == 1 and r[0]["ops"] == rows[-1][0]["ops"]
    result = rrto.search_result
    assert result.found and result.period == rows[-1][0]["ops"]
    assert rrto.stats()["templates"] == 1


def test_two_sync_points_per_inference_cost_two_round_trips(rrto):
    torch.manual_seed(0)

    def forward(model, x):
        h = model(x)
        if h.abs().max().item() > 1e6:  # a host sync inside the inference (a guard, say)
            h = h.clamp(-1e6, 1e6)
        return model(h)

    rows = offloaded_matches_local(rrto, nn.Linear(6, 6), [torch.randn(3, 6) for _ in range(8)],
                                   forward)
    steady = rows[-1]
    assert all(r["phase"] == "replay" for r in steady)
    assert sum(r["rpcs"] for r in steady) == 2


def test_data_dependent_control_flow_falls_back_and_stays_correct(rrto):
    torch.manual_seed(0)

    def forward(model, x):
        h = model(x)
        if h.sum().item() > 0:  # the branch taken depends on the data
            return torch.relu(h) * 3
        return torch.tanh(h) - 1

    inputs = [torch.randn(2, 5) * (1 if i % 3 else -4) for i in range(12)]
    rows = offloaded_matches_local(rrto, nn.Linear(5, 5), inputs, forward)
    phases = {r["phase"] for rs in rows for r in rs}
    assert "replay" in phases and "fallback" in phases


def test_batch_size_change_mid_loop_keeps_one_template_per_shape(rrto):
    local = cnn()
    remote = copy.deepcopy(local).cuda()
    sizes = [4] * 5 + [2] * 5 + [4] * 3
    inputs = [torch.randn(b, 3, 8, 8) for b in sizes]
    with torch.no_grad():
        outs, rows = run_loop(rrto, remote, inputs)
        for got, x in zip(outs, inputs, strict=True):
            torch.testing.assert_close(got, local(x), rtol=1e-5, atol=1e-5)
    assert rrto.stats()["templates"] == 2
    assert rows[5][0]["phase"] != "replay"  # the first batch of 2 differs at its upload
    # back to batch 4: the first template is chosen again, without recording
    assert [r[-1]["phase"] for r in rows[10:]] == ["replay"] * 3


def test_in_place_weight_update_between_inferences(rrto):
    local = cnn()
    remote = copy.deepcopy(local).cuda()
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(12)]
    phases = []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            if i % 4 == 3:
                for m in (local, remote):
                    m[0].weight.mul_(1.1)  # e.g. a manual update, or weight loading
            before = len(rrto.inferences)
            got = remote(x.cuda()).cpu()
            phases.append(rrto.inferences[before]["phase"])
            torch.testing.assert_close(got, local(x), rtol=1e-5, atol=1e-5)
    # each update is not part of the template: that inference is recorded, then replay resumes
    assert [phases[i] for i in (7, 11)] == ["record", "record"]
    assert [phases[i] for i in (9, 10)] == ["replay", "replay"]


def test_a_training_step_is_a_period_like_any_other(rrto):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    remote = copy.deepcopy(local).cuda()
    opt_l = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt_r = torch.optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(10)]
    losses = []
    for x, y in data:
        for model, opt, dev in ((local, opt_l, "cpu"), (remote, opt_r, "cuda")):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    steady = rrto.inferences[-1]
    assert steady["phase"] == "replay" and steady["rpcs"] == 1  # forward, backward, step: 1 RPC
    for a, b in zip(losses[::2], losses[1::2], strict=True):
        assert abs(a - b) < 1e-5
    for p_l, p_r in zip(local.parameters(), remote.parameters(), strict=True):
        torch.testing.assert_close(p_r.detach().cpu(), p_l.detach(), rtol=1e-5, atol=1e-6)


def test_tensors_handed_out_during_replay_stay_readable(rrto):
    local = cnn()
    remote = copy.deepcopy(local).cuda()
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(8)]
    kept = []
    with torch.no_grad():
        for x in inputs:
            y = remote(x.cuda())
            kept.append(y)  # not copied to the host yet
            y.cpu()
        assert rrto.inferences[-1]["phase"] == "replay"
        for y, x in zip(kept, inputs, strict=True):
            torch.testing.assert_close(y.cpu(), local(x), rtol=1e-5, atol=1e-5)


def test_noise_between_inferences_is_filtered(rrto):
    local = cnn()
    remote = copy.deepcopy(local).cuda()
    counter = torch.zeros(1, device="cuda")
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(14)]
    with torch.no_grad():
        for i, x in enumerate(inputs):
            torch.testing.assert_close(remote(x.cuda()).cpu(), local(x), rtol=1e-5, atol=1e-5)
            if i % 5 == 4:
                counter += 1
                assert counter.item() == (i + 1) // 5  # a logging-style sync now and then
    assert rrto.inferences[-1]["phase"] == "replay"
    assert rrto.stats()["templates"] == 1


def _bert() -> nn.Module:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, vocab_size=1000)).eval()


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert"])
def test_real_traces_find_one_inference_as_the_period(rrto, name):
    """Operator Sequence Search on the token streams of unmodified models (issue: the search)."""
    if name == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
        inputs = [torch.randn(3, 16) for _ in range(5)]
    elif name == "cnn":
        model, inputs = cnn(), [torch.randn(2, 3, 8, 8) for _ in range(5)]
    else:
        model, inputs = _bert(), [torch.randint(0, 1000, (1, 12)) for _ in range(5)]
    remote = copy.deepcopy(model).cuda()
    found = []
    with torch.no_grad():
        for i, x in enumerate(inputs):
            before = rrto.stats()["ops"]
            y = remote(x.cuda())
            (y.last_hidden_state if name == "bert" else y).cpu()
            per_inference = rrto.stats()["ops"] - before
            if rrto.search_result is not None and rrto.search_result.found and i >= 2:
                found.append((rrto.search_result.period, per_inference))
    assert found, rrto.search_result.explain()
    period, per_inference = found[0]
    assert period == per_inference  # the period is one whole inference, not a layer of it
    assert rrto.inferences[-1]["phase"] == "replay"


@pytest.mark.parametrize("mode", ["async", "rrto"])
def test_errors_of_queued_ops_surface_at_the_next_sync_point(server_address, mode):
    s = rrto_lab.connect(server_address, mode=mode)
    with s:
        x = torch.arange(6.0, device="cuda")

        def pick(index: list[int]) -> torch.Tensor:
            return torch.index_select(x, 0, torch.tensor(index, device="cuda")) * 2

        assert pick([0, 1]).tolist() == [0.0, 2.0]  # learns the metadata: next time it queues
        y = pick([0, 99])  # queued without waiting: no error yet
        with pytest.raises(rrto_lab.RemoteError, match="index_select") as info:
            y.cpu()
        assert "queued op" in str(info.value) and "index" in str(info.value).lower()
        assert pick([5, 4]).tolist() == [10.0, 8.0]  # the session carries on
    s.close()
