"""Unmodified models give the same answers offloaded as on the local CPU.

Each test builds a model from a fixed seed, computes a reference with plain torch (the session
deactivated, so the reference is torch as shipped), then moves a deep copy to ``cuda`` inside the
active session and runs the very same code. The server runs the same ATen ops on a CPU device, so
results agree to float rounding. Each test also checks that the work really was offloaded: the
outputs say ``cuda:0`` and the session counted a plausible number of ops.

Hugging Face models are built from tiny configs with random weights: nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from rrto_lab.remote_tensor import RemoteTensor
from rrto_lab.session import Session

os.environ["HF_HUB_OFFLINE"] = "1"
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

ATOL = 1e-5
RTOL = 1e-5


@contextlib.contextmanager
def cpu_only(session: Session) -> Iterator[None]:
    """Run the block with plain torch: the session deactivated, then active again."""
    session.deactivate()
    try:
        yield
    finally:
        session.activate()


def offloaded(session: Session, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` in the active session; return its result and the number of ops it sent."""
    before = session.stats()["ops"]
    result = fn()
    return result, session.stats()["ops"] - before


def assert_remote(t: torch.Tensor) -> None:
    assert isinstance(t, RemoteTensor)
    assert t.device == torch.device("cuda", 0) and t.is_cuda


def assert_close(remote: torch.Tensor, local: torch.Tensor) -> None:
    assert_remote(remote)
    got = remote.detach().cpu()
    assert got.device.type == "cpu" and not isinstance(got, RemoteTensor)
    torch.testing.assert_close(got, local.detach(), atol=ATOL, rtol=RTOL)


def eval_forward(session: Session, model: nn.Module, *args: torch.Tensor,
                 **kwargs: torch.Tensor) -> tuple[Any, Any, int]:
    """(local output, offloaded output, ops sent by the offloaded forward) under no_grad."""
    model.eval()
    with cpu_only(session), torch.no_grad():
        local = model(*args, **kwargs)
    remote_model = copy.deepcopy(model).cuda()
    cuda_args = [a.cuda() for a in args]
    cuda_kwargs = {k: v.cuda() for k, v in kwargs.items()}
    with torch.no_grad():
        remote, ops = offloaded(session, lambda: remote_model(*cuda_args, **cuda_kwargs))
    return local, remote, ops


# -- plain torch models ------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_mlp_forward(session):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 4))
    x = torch.randn(8, 16)
    local, remote, ops = eval_forward(session, model, x)
    assert_close(remote, local)
    assert 5 <= ops <= 20  # three linears, two activations


def test_cnn_batchnorm_eval(session):
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics, so eval mode really uses them
        for bn in (model.features[1], model.features[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 16, 16)
    local, remote, ops = eval_forward(session, model, x)
    assert_close(remote, local)
    assert 9 <= ops <= 40


def test_cnn_batchnorm_training_step(session):
    model = SmallCNN().train()
    remote_model = copy.deepcopy(model)
    x, target = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))

    def step(m: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):  # the second step uses the momentum buffers
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
        return loss.detach()

    with cpu_only(session):
        local_loss = step(model, x, target)
    remote_model.cuda()
    x_cuda, target_cuda = x.cuda(), target.cuda()
    remote_loss, ops = offloaded(session, lambda: step(remote_model, x_cuda, target_cuda))

    assert_close(remote_loss, local_loss)
    remote_state, local_state = remote_model.state_dict(), model.state_dict()
    assert remote_state.keys() == local_state.keys()
    for name, value in local_state.items():  # weights, running stats, num_batches_tracked
        assert_close(remote_state[name], value)
    for (name, p_remote), p_local in zip(remote_model.named_parameters(), model.parameters(),
                                         strict=True):
        assert p_remote.grad is not None, name
        assert_close(p_remote.grad, p_local.grad)
    assert 100 <= ops <= 1000  # two forwards, two backwards, two optimizer steps


def test_transformer_encoder(session):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    src = torch.randn(2, 10, 32)
    # no_grad in eval takes the fused fast path: one aten::_transformer_encoder_layer_fwd a layer
    local, remote, ops = eval_forward(session, model, src)
    assert_close(remote, local)
    assert 2 <= ops <= 10

    # with autograd on, the layers run op by op; the gradient of the input matches too
    with cpu_only(session):
        local_src = src.clone().requires_grad_(True)
        local = model(local_src)
        local.sum().backward()
    remote_model = copy.deepcopy(model).cuda()
    remote_src = src.cuda().requires_grad_(True)
    remote, ops = offloaded(session, lambda: remote_model(remote_src))
    assert_close(remote, local)
    assert 40 <= ops <= 300
    remote.sum().backward()
    assert_close(remote_src.grad, local_src.grad)


# -- Hugging Face transformers, tiny configs, random weights ---------------------------------
def test_bert(session):
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=1000)
    model = transformers.BertModel(config)
    input_ids = torch.randint(0, 1000, (2, 16))
    attention_mask = torch.ones(2, 16, dtype=torch.long)
    attention_mask[1, 12:] = 0  # padding in the second sequence
    local, remote, ops = eval_forward(session, model, input_ids=input_ids,
                                      attention_mask=attention_mask)
    assert_close(remote.last_hidden_state, local.last_hidden_state)
    assert_close(remote.pooler_output, local.pooler_output)
    assert 60 <= ops <= 400


def gpt2() -> nn.Module:
    # a wide initializer keeps greedy decoding from repeating one token forever
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     vocab_size=1000, bos_token_id=0, eos_token_id=0,
                                     pad_token_id=0, initializer_range=0.3)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_logits(session):
    input_ids = torch.randint(1, 1000, (2, 12))
    local, remote, ops = eval_forward(session, gpt2(), input_ids=input_ids)
    assert_close(remote.logits, local.logits)
    assert 60 <= ops <= 400


def test_gpt2_generate_greedy(session):
    model = gpt2()
    prompt = torch.randint(1, 1000, (2, 6))
    mask = torch.ones_like(prompt)
    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}
    with cpu_only(session), torch.no_grad():
        local = model.generate(prompt, attention_mask=mask, **settings)
    assert len(set(local[0, 6:].tolist())) > 3  # the decoding is not degenerate
    remote_model = copy.deepcopy(model).cuda()
    prompt_cuda, mask_cuda = prompt.cuda(), mask.cuda()
    with torch.no_grad():
        remote, ops = offloaded(session, lambda: remote_model.generate(
            prompt_cuda, attention_mask=mask_cuda, **settings))
    assert_remote(remote)
    assert torch.equal(remote.cpu(), local)
    assert 10 * 60 <= ops <= 10 * 400  # ten forwards


def test_cpu_generate_unaffected_by_active_session(session):
    model = gpt2()
    prompt = torch.randint(1, 1000, (1, 6))
    settings = {"max_new_tokens": 8, "do_sample": False,
                "attention_mask": torch.ones_like(prompt)}
    with cpu_only(session), torch.no_grad():
        local = model.generate(prompt, **settings)
    before = session.stats()["ops"]
    with torch.no_grad():
        again = model.generate(prompt, **settings)
    assert torch.equal(again, local)
    assert session.stats()["ops"] == before  # nothing of a CPU model goes to the server


def test_resnet(session):
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       num_labels=10)
    model = transformers.ResNetForImageClassification(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    pixel_values = torch.randn(2, 3, 32, 32)
    local, remote, ops = eval_forward(session, model, pixel_values=pixel_values)
    assert_close(remote.logits, local.logits)
    assert 20 <= ops <= 150
