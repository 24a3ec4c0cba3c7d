"""The transparency list of the remote-CUDA issue, item by item, against a real server."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import rrto_lab
from rrto_lab.remote_tensor import RemoteTensor


def test_moving_tensors_says_cuda(session):
    x = torch.arange(6.0).reshape(2, 3)
    for moved in (x.cuda(), x.cuda(0), x.to("cuda"), x.to("cuda:0"),
                  x.to(torch.device("cuda", 0)), x.to(device="cuda", dtype=torch.float64)):
        assert isinstance(moved, RemoteTensor)
        assert moved.device == torch.device("cuda", 0)
        assert moved.is_cuda and moved.get_device() == 0
        assert torch.equal(moved.cpu(), x.to(moved.dtype))
    assert x.to("cuda").to("cuda") is not None
    y = x.cuda()
    assert y.to("cuda") is y  # already there: no copy, as on a GPU
    assert y.cpu().device.type == "cpu" and y.to("cpu").device.type == "cpu"
    # `copy` in every form Tensor.to accepts, remote and local
    assert y.to("cuda", copy=True) is not y and x.to(torch.float32, copy=True) is not x
    assert torch.equal(y.to(copy=True, dtype=torch.float64, device=y.device).cpu(), x.double())
    assert torch.equal(x.to("cuda", torch.float32, False, True).cpu(), x)
    assert x.to(torch.float64, False, True).dtype == torch.float64


def test_factories_with_cuda_device(session):
    torch.cuda.manual_seed(1)
    a = torch.randn(3, 4, device="cuda")
    torch.cuda.manual_seed(1)
    b = torch.randn(3, 4, device="cuda")
    assert a.device.type == "cuda" and torch.equal(a.cpu(), b.cpu())
    assert torch.equal(torch.zeros(2, 3, device="cuda").cpu(), torch.zeros(2, 3))
    assert torch.equal(torch.ones(4, device=torch.device("cuda")).cpu(), torch.ones(4))
    assert torch.equal(torch.arange(5, device="cuda").cpu(), torch.arange(5))
    assert torch.equal(torch.full((2,), 7.0, device="cuda:0").cpu(), torch.full((2,), 7.0))
    t = torch.tensor([[1, 2], [3, 4]], device="cuda")
    assert t.is_cuda and t.dtype == torch.int64 and t.tolist() == [[1, 2], [3, 4]]
    assert torch.as_tensor([1.5], device="cuda").item() == 1.5
    assert torch.empty(3, device="cuda").shape == (3,)
    z = torch.zeros_like(a)
    assert z.is_cuda and torch.equal(z.cpu(), torch.zeros(3, 4))


def test_module_cuda_and_to(session):
    torch.manual_seed(0)
    local = torch.nn.Linear(4, 3)
    remote = torch.nn.Linear(4, 3)
    remote.load_state_dict(local.state_dict())
    remote.cuda()
    assert all(p.is_cuda for p in remote.parameters())
    assert isinstance(remote.weight, torch.nn.Parameter) or remote.weight._is_param
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.allclose(remote(x.cuda()).cpu(), local(x), atol=1e-6)
    other = torch.nn.Linear(4, 3).to("cuda")
    assert other.weight.is_cuda
    back = remote.cpu()
    assert not back.weight.is_cuda and torch.allclose(back.weight, local.weight)
    lazy = torch.nn.LazyLinear(3)
    with pytest.raises(rrto_lab.RrtoError, match="run the model once"):
        lazy.cuda()
    lazy(torch.randn(2, 5))  # initialized: now it moves
    assert lazy.cuda().weight.is_cuda


def test_item_tolist_numpy_repr(session):
    x = torch.tensor([[1.5, -2.0], [3.0, 4.25]]).cuda()
    assert x[0, 0].item() == 1.5
    assert x.tolist() == [[1.5, -2.0], [3.0, 4.25]]
    assert (x.cpu().numpy() == x.tolist()).all()
    with pytest.raises(TypeError, match="Tensor.cpu"):
        x.numpy()
    text = repr(x)
    assert "device='cuda:0'" in text and "4.2500" in text
    assert str(x) == text
    assert "device='cuda:0', dtype=torch.float16" in repr(x.half())
    g = x.clone().requires_grad_()
    assert "requires_grad=True" in repr(g) and "grad_fn=<MulBackward0>" in repr(g * 2)
    assert f"{x.sum():.2f}" == "6.75"
    assert bool(x.sum() > 0) and int(x[1, 1]) == 4 and float(x[0, 1]) == -2.0


def test_indexing_with_lists_and_masks(session):
    base = torch.arange(12.0).reshape(3, 4)
    x = base.cuda()
    assert torch.equal(x[[0, 2]].cpu(), base[[0, 2]])
    assert torch.equal(x[:, [1, 3]].cpu(), base[:, [1, 3]])
    assert torch.equal(x[x > 5].cpu(), base[base > 5])
    assert torch.equal(x[torch.tensor([2, 0])].cpu(), base[torch.tensor([2, 0])])
    assert torch.equal(torch.nonzero(x > 9).cpu(), torch.nonzero(base > 9))
    y = x.clone()
    y[[0, 1]] = 0.0
    y[y > 10] = -1.0
    expect = base.clone()
    expect[[0, 1]] = 0.0
    expect[expect > 10] = -1.0
    assert torch.equal(y.cpu(), expect)


def test_views_and_in_place_alias_exactly(session):
    local = torch.zeros(3, 4)
    remote = local.clone().cuda()
    for t in (local, remote):
        v = t[1]
        v.add_(5)
        t.t()[2].mul_(2)
        t.view(12)[0] = 9
        d = t.diagonal()
        d.sub_(1)
        t.unsqueeze_(0)
        t.squeeze_(0)
    assert torch.equal(remote.cpu(), local)
    r2 = remote.clone()
    r2.transpose_(0, 1)
    assert r2.shape == (4, 3) and torch.equal(r2.cpu(), local.t())
    assert remote[1]._base is remote or remote[1]._is_view()
    r3 = torch.zeros(2, device="cuda")
    r3.resize_(6)
    assert r3.shape == (6,)


def test_dtype_conversions(session):
    x = torch.randn(4, 5)
    r = x.cuda()
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool):
        assert torch.equal(r.to(dtype).cpu(), x.to(dtype))
    assert r.half().dtype == torch.float16 and r.bfloat16().dtype == torch.bfloat16
    assert r.double().float().dtype == torch.float32
    assert torch.equal(x.half().cuda().float().cpu(), x.half().float())


def test_autograd_forward_and_backward(session):
    torch.manual_seed(0)
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(4, 3)
    (x @ w).tanh().sum().backward()
    rw = w.detach().cuda().requires_grad_()
    (x.cuda() @ rw).tanh().sum().backward()
    assert rw.grad.is_cuda and torch.allclose(rw.grad.cpu(), w.grad, atol=1e-6)
    # a differentiable host->device copy keeps the graph, as on a GPU
    leaf = torch.randn(3, requires_grad=True)
    (leaf.cuda() * 2).sum().backward()
    assert torch.equal(leaf.grad, torch.full((3,), 2.0))
    # autograd through in-place ops on a view
    a = torch.randn(4, device="cuda", requires_grad=True)
    b = a * 1
    b[1:3].mul_(3)
    b.sum().backward()
    assert torch.equal(a.grad.cpu(), torch.tensor([1.0, 3.0, 3.0, 1.0]))


def test_cuda_device_queries_answer_from_server(session):
    assert torch.cuda.is_available()
    assert torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
    name = torch.cuda.get_device_name()
    assert name.endswith("(remote via rrto)") and name.startswith(session.device_info["name"])
    props = torch.cuda.get_device_properties(0)
    assert props.name == name and props.total_memory > 0
    assert torch.cuda.get_device_capability() == (props.major, props.minor)
    torch.cuda.synchronize()
    torch.cuda.manual_seed_all(3)
    before = torch.cuda.memory_allocated()
    keep = torch.empty(1 << 20, device="cuda")
    assert torch.cuda.memory_allocated() >= before + (1 << 22)
    assert torch.cuda.max_memory_allocated() >= torch.cuda.memory_allocated()
    del keep
    torch.cuda.empty_cache()
    torch.cuda.synchronize()  # carries the free
    assert torch.cuda.memory_allocated() == before


def test_rng_state_round_trip_and_fork_rng(session):
    state = torch.cuda.get_rng_state()
    a = torch.rand(3, device="cuda").cpu()
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda").cpu(), a)
    with torch.random.fork_rng():
        torch.rand(1)
    cpu_state = torch.get_rng_state()
    with torch.random.fork_rng():
        torch.rand(5)
    assert torch.equal(torch.get_rng_state(), cpu_state)


def test_autocast_casts_as_on_a_gpu(session):
    a = torch.randn(8, 8, device="cuda")
    b = torch.randn(8, 8, device="cuda")
    lin = torch.nn.Linear(8, 4).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        mm = a @ b
        out = lin(a)
        soft = torch.softmax(mm, dim=-1)
        added = a + b
    assert mm.dtype == torch.float16 and out.dtype == torch.float16
    assert soft.dtype == torch.float32  # softmax runs in float32 under CUDA autocast
    assert added.dtype == torch.float32
    assert torch.allclose(mm.float().cpu(), (a.cpu().half() @ b.cpu().half()).float(), atol=1e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32  # off again after the block
    w = torch.randn(8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = (a @ w).float().sum()
    loss.backward()
    assert w.grad.dtype == torch.float32


def test_events_streams_and_async_copies(session):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    x = torch.randn(256, 256, device="cuda")
    start.record()
    for _ in range(3):
        x = x @ x.t() / 256
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) > 0
    with pytest.raises(RuntimeError, match="enable_timing"):
        torch.cuda.Event().elapsed_time(torch.cuda.Event())
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = (x * 2).sum()
    torch.cuda.current_stream().wait_stream(s)
    s.synchronize()
    assert torch.allclose(y.cpu(), (x.cpu() * 2).sum())
    h = torch.randn(10).pin_memory()
    d = h.to("cuda", non_blocking=True)
    back = d.to("cpu", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, h)


def test_dataloader_with_pin_memory(session):
    data = torch.utils.data.TensorDataset(torch.arange(20.0).reshape(10, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4, pin_memory=True)
    total = torch.zeros(2, device="cuda")
    for (batch,) in loader:
        total += batch.cuda(non_blocking=True).sum(0)
    assert torch.equal(total.cpu(), torch.arange(20.0).reshape(10, 2).sum(0))


def test_torch_save_stores_the_data(session, tmp_path):
    model = torch.nn.Linear(3, 2).cuda()
    t = torch.randn(4, device="cuda")
    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "t": t}, buf)
    torch.save(model, tmp_path / "model.pt")
    buf.seek(0)
    loaded = torch.load(buf)
    assert type(loaded["t"]) is torch.Tensor and loaded["t"].device.type == "cpu"
    assert torch.equal(loaded["t"], t.cpu())
    assert torch.equal(loaded["state"]["weight"], model.weight.detach().cpu())
    m2 = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(m2.bias.detach(), model.bias.detach().cpu())
    assert type(m2.weight) is torch.nn.Parameter


def test_leaving_restores_torch_exactly(server_address):
    def snapshot():
        return ({n: getattr(torch.cuda, n) for n in dir(torch.cuda)},
                dict(torch.Tensor.__dict__), torch.tensor, torch.autocast.__enter__,
                torch.__future__.get_swap_module_params_on_conversion())

    before = snapshot()
    s = rrto_lab.connect(server_address)
    with s:
        assert torch.cuda.is_available()
        x = torch.ones(2, device="cuda")
    assert not torch.cuda.is_available()
    assert snapshot() == before
    with pytest.raises(RuntimeError):
        torch.zeros(1, device="cuda")  # the CPU build's own error again
    # still usable while the session is open, even when inactive
    assert torch.equal(x.cpu(), torch.ones(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.close()
    assert any("drops 1 remote tensor" in str(w.message) for w in caught)
    with pytest.raises(rrto_lab.SessionClosed, match="closed"):
        x + 1
    with pytest.raises(rrto_lab.SessionClosed):
        x.cpu()
    assert snapshot() == before
    assert not torch.accelerator.is_available()


def test_stats_count_ops_and_round_trips(session):
    def step() -> float:
        x = torch.ones(16, device="cuda")
        return (x * 2 + 1).sum().item()

    before = session.stats()
    assert step() == 48.0
    after = session.stats()
    ops, rpcs = after["ops"] - before["ops"], after["rpcs"] - before["rpcs"]
    assert ops >= 4
    if session.mode == "rpc":
        assert rpcs == ops  # one round trip per op
    else:
        assert 1 <= rpcs <= ops
        assert step() == 48.0  # async: predicted and queued; rrto: the template is found here
        again = session.stats()
        assert step() == 48.0  # async: queued again; rrto: replayed
        last = session.stats()
        assert last["rpcs"] - again["rpcs"] == 1 and last["ops"] - again["ops"] == ops
        assert session.inferences[-1]["phase"] == ("replay" if session.mode == "rrto" else
                                                   "async")
    assert after["bytes_sent"] > before["bytes_sent"]
    assert after["bytes_received"] > before["bytes_received"]
    assert set(after) >= {"ops", "rpcs", "messages", "bytes_sent", "bytes_received"}


def test_attention_is_one_fused_op_for_inference_and_differentiable(session):
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    rq, rk, rv = q.cuda(), k.cuda(), v.cuda()
    before = len(session.telemetry.trace)
    with torch.no_grad():
        out = torch.nn.functional.scaled_dot_product_attention(rq, rk, rv, is_causal=True)
    ops = [name for _, name, _ in list(session.telemetry.trace)[before:]]
    assert ops == ["scaled_dot_product_attention"]  # the server's fused kernel, not bmm+softmax
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    lq, gq = q.clone().requires_grad_(), rq.detach().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(lq, k, v).sum().backward()
    torch.nn.functional.scaled_dot_product_attention(gq, rk, rv).sum().backward()
    torch.testing.assert_close(gq.grad.cpu(), lq.grad, rtol=1e-5, atol=1e-5)
