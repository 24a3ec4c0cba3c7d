"""The IPython extension on a real InteractiveShell, and in a real kernel via nbclient."""

from __future__ import annotations

import os

import nbformat
import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from nbclient import NotebookClient
from traitlets import TraitError

SNAPSHOT_NAMES = ("is_available", "device_count", "get_device_name", "_lazy_init", "Event")


def pristine() -> tuple:
    """What an rrto session changes: it must all be back after unloading."""
    return (tuple(getattr(torch.cuda, n) for n in SNAPSHOT_NAMES),
            "to" in torch.Tensor.__dict__, torch.tensor, torch.autocast.__enter__,
            torch.__future__.get_swap_module_params_on_conversion())


@pytest.fixture
def ip(server_address, monkeypatch, capsys):
    monkeypatch.setenv("RRTO_SERVER", server_address)
    shell = start_ipython() or InteractiveShell.instance()  # one real shell; config reset below
    for setting in ("server = None", "mode = 'rrto'", "timeout = 30.0", "token = None"):
        shell.run_line_magic("config", f"Rrto.{setting}")
    before = pristine()
    yield shell
    if "rrto" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "rrto")
    assert pristine() == before and not torch.cuda.is_available()


def out(capsys) -> str:
    return capsys.readouterr().out


def test_load_prints_one_line_and_redirects_cuda(ip, capsys, server_address):
    ip.run_line_magic("load_ext", "rrto")
    line = out(capsys).strip()
    assert line.startswith(f"rrto: server {server_address}, remote device ")
    assert line.endswith("mode rrto")
    ip.run_cell("import torch; flag = torch.cuda.is_available(); t = torch.ones(2).cuda()")
    assert ip.user_ns["flag"] is True and ip.user_ns["t"].is_cuda
    ip.run_line_magic("load_ext", "rrto")  # twice is harmless
    assert "already loaded" in out(capsys)


def test_unload_and_reload_leave_torch_pristine(ip, capsys):
    before = pristine()
    ip.run_line_magic("load_ext", "rrto")
    assert torch.cuda.is_available()
    ip.run_line_magic("reload_ext", "rrto")
    assert torch.cuda.is_available()
    ip.run_cell("import torch; r = torch.arange(3.0, device='cuda').sum().item()")
    assert ip.user_ns["r"] == 3.0
    ip.run_line_magic("unload_ext", "rrto")
    assert pristine() == before and not torch.cuda.is_available()


def test_status_trace_inferences_reset_dashboard(ip, capsys):
    ip.run_line_magic("load_ext", "rrto")
    ip.run_cell("import torch; x = torch.ones(4).cuda(); v = (x * 3).sum().item()")
    out(capsys)
    ip.run_line_magic("rrto", "status")
    status = out(capsys)
    assert "mode        rrto" in status and "(remote)" in status and "ops " in status
    ip.run_line_magic("rrto", "trace --last 3")
    trace = out(capsys).splitlines()
    assert trace[0].split() == ["index", "op", "phase"] and len(trace) == 4
    assert "_local_scalar_dense" in trace[-1]
    ip.run_line_magic("rrto", "inferences")
    rows = out(capsys).splitlines()
    assert rows[0].split()[:4] == ["index", "phase", "ops", "rpcs"] and len(rows) >= 2
    ip.run_line_magic("rrto", "reset")
    assert "forgotten" in out(capsys)
    ip.run_line_magic("rrto", "inferences")
    assert "no inferences yet" in out(capsys)
    ip.run_line_magic("rrto", "dashboard")
    assert "dashboard" in out(capsys)


def test_mode_and_config(ip, capsys):
    ip.run_line_magic("load_ext", "rrto")
    magics = ip._rrto_magics
    ip.run_line_magic("rrto", "mode async")
    assert magics.session.mode == "async"
    ip.run_line_magic("config", "Rrto.mode = 'rpc'")
    assert magics.session.mode == "rpc"
    ip.run_cell("import torch; s = (torch.ones(3).cuda() + 1).sum().item()")
    assert ip.user_ns["s"] == 6.0
    ip.run_line_magic("config", "Rrto.timeout = 5.0")
    assert magics.timeout == 5.0
    with pytest.raises(TraitError, match="positive"):
        magics.timeout = -1
    ip.run_line_magic("config", "Rrto.timeout = -1")  # %config reports it and keeps the value
    assert magics.timeout == 5.0
    with pytest.raises(UsageError, match="unknown mode"):
        ip.run_line_magic("rrto", "mode fast")


def test_connect_disconnect_and_link(ip, capsys, server_address):
    ip.run_line_magic("load_ext", "rrto")
    ip.run_line_magic("rrto", "disconnect")
    assert not torch.cuda.is_available() and "restored" in out(capsys)
    with pytest.raises(UsageError, match="not connected"):
        ip.run_line_magic("rrto", "status")
    ip.run_line_magic("rrto", f"connect {server_address}")
    assert torch.cuda.is_available() and server_address in out(capsys)
    ip.run_line_magic("rrto", "link --rtt-ms 2 --mbps 100")
    assert "rtt 2 ms, 100 Mbit/s" in out(capsys)
    session = ip._rrto_magics.session
    assert session.link is not None and session.address != server_address
    ip.run_cell("import torch; y = (torch.ones(2).cuda() * 2).tolist()")
    assert ip.user_ns["y"] == [2.0, 2.0]
    ip.run_line_magic("rrto", "link off")
    assert session.link is None and session.address == server_address


def test_bad_input_is_a_usage_error_and_leaves_torch_alone(ip, capsys):
    ip.run_line_magic("config", "Rrto.timeout = 1.0")
    ip.run_line_magic("config", "Rrto.server = 'tcp://127.0.0.1:9'")
    before = pristine()
    with pytest.raises(UsageError, match="tcp://127.0.0.1:9"):
        ip.run_line_magic("load_ext", "rrto")
    assert pristine() == before and "rrto" not in ip.extension_manager.loaded
    ip.run_line_magic("config", "Rrto.server = None")
    ip.run_line_magic("config", "Rrto.timeout = 30.0")
    ip.run_line_magic("load_ext", "rrto")
    with pytest.raises(UsageError):
        ip.run_line_magic("rrto", "explode")
    with pytest.raises(UsageError, match="link"):
        ip.run_line_magic("rrto", "link sideways")
    with pytest.raises(UsageError, match="could not connect"):
        ip.run_line_magic("rrto", "connect tcp://127.0.0.1:9 --token x")
    assert not torch.cuda.is_available()  # the old session was closed first, torch restored


def test_cell_magic_repeat_shows_replay_engaging_on_a_cnn(ip, capsys):
    ip.run_line_magic("load_ext", "rrto")
    ip.run_cell("""
import torch
from torch import nn
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                    nn.LazyLinear(4)).eval()
x = torch.randn(2, 3, 10, 10)
with torch.no_grad():
    local = net(x)
remote = net.cuda()
""")
    out(capsys)
    ip.run_cell_magic("rrto", "--repeat 10", "with torch.no_grad():\n"
                                             "    y = remote(x.cuda()).cpu()\nprint('ran')")
    report = out(capsys)
    assert report.count("ran") == 1  # only the last run shows its output
    lines = report.splitlines()
    table = lines[lines.index(next(ln for ln in lines if ln.split()[:2] == ["run", "ops"])):]
    assert len(table) == 1 + 10 + 1
    assert "replay engaged at run" in table[-1]
    last = table[-2].split()
    assert last[-1] == "replay" and last[2] == "1"  # one round trip per inference
    assert torch.allclose(ip.user_ns["y"], ip.user_ns["local"], atol=1e-5)


def test_cell_magic_mode_warmup_quiet_and_redirection_off(ip, capsys):
    ip.run_line_magic("load_ext", "rrto")
    magics = ip._rrto_magics
    magics.session.deactivate()
    ip.run_cell_magic("rrto", "--mode rpc --warmup 2 --repeat 3",
                      "import torch\nz = torch.ones(3, device='cuda').sum().item()")
    report = out(capsys)
    assert ip.user_ns["z"] == 3.0 and "run" in report
    assert len([ln for ln in report.splitlines() if ln.strip()[:1].isdigit()]) == 3
    assert magics.session.mode == "rrto" and not torch.cuda.is_available()  # as before
    ip.run_cell_magic("rrto", "--quiet", "w = 1 + 1")
    assert ip.user_ns["w"] == 2 and out(capsys) == ""
    with pytest.raises(UsageError):
        ip.run_cell_magic("rrto", "--repeat 0", "pass")


def test_notebook_on_a_real_kernel(server_address, tmp_path, monkeypatch):
    monkeypatch.setenv("RRTO_SERVER", server_address)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "%load_ext rrto",
        "import torch\nfrom torch import nn\ntorch.manual_seed(0)\n"
        "m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).cuda()\n"
        "x = torch.randn(4, 8)\nprint(torch.cuda.is_available(), m[0].weight.device)",
        "%%rrto --repeat 8\nwith torch.no_grad():\n    y = m(x.cuda()).cpu()",
        "%rrto status",
        "%unload_ext rrto\nprint('after', torch.cuda.is_available())",
    )]
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells]
    assert text[0].startswith(f"rrto: server {server_address}")
    assert "True cuda:0" in text[1]
    assert "replay engaged at run" in text[2]
    assert "mode        rrto" in text[3]
    assert "after False" in text[4]
    assert os.environ["RRTO_SERVER"] == server_address


def test_token_file_and_link_defaults_from_config(ip, capsys, tmp_path):
    from tests.conftest import start_server, stop_server

    proc, address = start_server("--token", "t0ken")
    try:
        (tmp_path / "token").write_text("t0ken\n")
        ip.run_line_magic("config", f"Rrto.server = {address!r}")
        ip.run_line_magic("config", f"Rrto.token_file = {str(tmp_path / 'token')!r}")
        ip.run_line_magic("config", "Rrto.link_rtt_ms = 3.0")
        ip.run_line_magic("load_ext", "rrto")
        assert address in out(capsys)
        ip.run_line_magic("rrto", "link")
        assert "rtt 3 ms" in out(capsys) and ip._rrto_magics.session.link.rtt_ms == 3.0
        ip.run_cell("import torch; k = torch.ones(2).cuda().sum().item()")
        assert ip.user_ns["k"] == 2.0
        ip.run_line_magic("unload_ext", "rrto")
    finally:
        ip.run_line_magic("config", "Rrto.token_file = None")
        ip.run_line_magic("config", "Rrto.link_rtt_ms = 0.0")
        stop_server(proc)
