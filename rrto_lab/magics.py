"""The IPython front door: ``%load_ext rrto``, ``%rrto``, ``%%rrto`` and ``%config Rrto``.

``%load_ext rrto`` opens a session (``Rrto.server``, else ``RRTO_SERVER``, else the embedded
server) and activates it for the whole kernel; ``%unload_ext rrto`` closes it and restores torch.
The magics only talk to the server through the session, and show what its telemetry recorded.
Every mistake a person can make here is a ``UsageError`` with a sentence that says what to do.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.utils.capture import capture_output
from traitlets import Enum, Float, TraitError, Unicode, observe, validate

import rrto_lab
from rrto_lab.errors import RrtoError
from rrto_lab.session import MODES, Session

COMMANDS = ("status", "connect", "disconnect", "mode", "link", "reset", "trace", "inferences",
            "dashboard")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain text table (it reads the same in a terminal, a notebook and a test)."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


@magics_class
class Rrto(Magics):
    """rrto's magics and configuration (``%config Rrto``)."""

    server = Unicode(None, allow_none=True, config=True,
                     help="Address of the rrto-server (tcp://HOST:PORT or ipc://PATH). Unset: "
                          "the RRTO_SERVER environment variable, else an embedded server.")
    token = Unicode(None, allow_none=True, config=True,
                    help="Token the server requires (else RRTO_TOKEN).")
    token_file = Unicode(None, allow_none=True, config=True,
                         help="File whose first line is the token (wins over `token`).")
    mode = Enum(MODES, default_value="rrto", config=True,
                help="rrto (record, then replay), async (queued ops) or rpc (one round trip "
                     "per op). Changing it switches the open session.")
    timeout = Float(30.0, config=True, help="Seconds to wait for the server before giving up.")
    link_rtt_ms = Float(0.0, config=True,
                        help="Round-trip time of the emulated link `%%rrto link` starts by "
                             "default (ms).")
    link_mbps = Float(0.0, config=True,
                      help="Bandwidth of the emulated link `%%rrto link` starts by default "
                           "(Mbit/s, 0 = unlimited).")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.session: Session | None = None

    @validate("timeout")
    def _check_timeout(self, proposal: Any) -> float:
        if proposal["value"] <= 0:
            raise TraitError("Rrto.timeout must be a positive number of seconds")
        return proposal["value"]

    @validate("link_rtt_ms", "link_mbps")
    def _check_link(self, proposal: Any) -> float:
        if proposal["value"] < 0:
            raise TraitError(f"Rrto.{proposal['trait'].name} cannot be negative")
        return proposal["value"]

    @observe("mode")
    def _switch_mode(self, change: dict) -> None:
        if self.session is not None:
            self.session.set_mode(change["new"])

    # -- the session ---------------------------------------------------------------------------
    def _token(self) -> str | None:
        if self.token_file:
            try:
                with open(self.token_file) as f:
                    return f.readline().strip()
            except OSError as e:
                raise UsageError(f"cannot read Rrto.token_file: {e}") from None
        return self.token

    def open(self, address: str | None = None, token: str | None = None) -> Session:
        """Open and activate a session; a failure leaves torch untouched."""
        try:
            session = rrto_lab.connect(address or self.server, mode=self.mode,
                                       token=token or self._token(), timeout_s=self.timeout)
        except RrtoError as e:
            raise UsageError(f"rrto could not connect: {e}") from None
        try:
            session.activate()
        except RrtoError as e:
            session.close()
            raise UsageError(f"rrto could not activate: {e}") from None
        self.session = session
        print(f"rrto: server {session.address}, remote device "
              f"{session.device_info['name']}, mode {session.mode}")
        return session

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close()

    def _need(self) -> Session:
        if self.session is None:
            raise UsageError("rrto is not connected: `%rrto connect ADDR`, or `%rrto connect` "
                             "for the embedded server")
        return self.session

    # -- %rrto ---------------------------------------------------------------------------------
    @magic_arguments()
    @argument("command", choices=COMMANDS, metavar="COMMAND",
              help="status | connect [ADDR] | disconnect | mode MODE | link [off] | reset | "
                   "trace | inferences | dashboard")
    @argument("value", nargs="?", help="ADDR for connect, MODE for mode, `off` for link")
    @argument("--token", help="with connect: the server's token")
    @argument("--rtt-ms", type=float, help="with link: round-trip time in ms")
    @argument("--mbps", type=float, help="with link: bandwidth in Mbit/s (0 = unlimited)")
    @argument("--last", type=int, default=20, help="with trace/inferences: how many rows")
    @line_magic
    def rrto(self, line: str) -> None:
        """Inspect and steer the rrto session of this kernel.

        status       server, remote device, mode, phase, templates and totals
        connect ADDR close the session and connect to ADDR (no ADDR: the embedded server)
        disconnect   close the session; torch is restored
        mode MODE    switch to rrto, async or rpc
        link         put an emulated link (--rtt-ms, --mbps) in front of the server; `link off`
        reset        forget templates and statistics
        trace        the recent operator stream: index, op, phase (--last N)
        inferences   one row per inference: phase, ops, RPCs, bytes, latency (--last N)
        dashboard    the live dashboard
        """
        args = parse_argstring(self.rrto, line)
        getattr(self, f"_cmd_{args.command}")(args)

    def _cmd_status(self, args: Any) -> None:
        s = self._need()
        phase = "replay" if s.replaying else (
            "record" if s.mode == "rrto" else s.mode)
        print(f"server      {s.server_address}" + (f" via link {s.link}" if s.link else ""))
        print(f"device      {s.device_info['name']} (remote)")
        print(f"mode        {s.mode}, phase {phase}, templates {len(s.templates)}")
        stats = s.stats()
        print("totals      " + ", ".join(f"{k} {v}" for k, v in stats.items()))

    def _cmd_connect(self, args: Any) -> None:
        self.close()
        self.open(args.value, args.token)

    def _cmd_disconnect(self, args: Any) -> None:
        self._need()
        self.close()
        print("rrto: disconnected; torch is restored")

    def _cmd_mode(self, args: Any) -> None:
        if args.value not in MODES:
            raise UsageError(f"unknown mode {args.value!r}: choose one of {', '.join(MODES)}")
        self.mode = args.value  # switches the session (see _switch_mode)
        print(f"rrto: mode {self.mode}")

    def _cmd_link(self, args: Any) -> None:
        s = self._need()
        if args.value == "off":
            s.set_link(None)
            print("rrto: no emulated link")
            return
        if args.value is not None:
            raise UsageError("use `%rrto link --rtt-ms N --mbps N` or `%rrto link off`")
        rtt = self.link_rtt_ms if args.rtt_ms is None else args.rtt_ms
        mbps = self.link_mbps if args.mbps is None else args.mbps
        try:
            s.set_link({"rtt_ms": rtt, "mbps": mbps})
        except (ValueError, RrtoError) as e:
            raise UsageError(f"rrto link: {e}") from None
        print(f"rrto: emulated link, rtt {rtt:g} ms, {mbps:g} Mbit/s" if mbps else
              f"rrto: emulated link, rtt {rtt:g} ms, unlimited bandwidth")

    def _cmd_reset(self, args: Any) -> None:
        self._need().reset()
        print("rrto: templates and statistics forgotten")

    def _cmd_trace(self, args: Any) -> None:
        trace = list(self._need().telemetry.trace)[-args.last:]
        print(_table([{"index": i, "op": op, "phase": ph} for i, op, ph in trace],
                     ["index", "op", "phase"]) if trace else "no ops yet")

    def _cmd_inferences(self, args: Any) -> None:
        rows = self._need().inferences[-args.last:]
        for r in rows:
            r["latency_ms"] = r.pop("latency_s") * 1e3
        print(_table(rows, ["index", "phase", "ops", "rpcs", "bytes_sent", "bytes_received",
                            "latency_ms"]) if rows else "no inferences yet")

    def _cmd_dashboard(self, args: Any) -> None:
        print("The live dashboard comes with rrto's dashboards; until then `%rrto inferences` "
              "and `%rrto trace` show the same telemetry as tables.")

    # -- %%rrto --------------------------------------------------------------------------------
    @magic_arguments()
    @argument("--mode", choices=MODES, help="run the cell in this mode (then switch back)")
    @argument("--repeat", type=int, default=1, help="run the cell this many times")
    @argument("--warmup", type=int, default=0, help="untimed runs first (not reported)")
    @argument("--quiet", action="store_true", help="no report after the cell")
    @cell_magic("rrto")
    def rrto_cell(self, line: str, cell: str) -> None:
        """Run the cell offloaded (even with redirection off), and report per run: ops, RPCs,
        latency and phase, and the run where replay engaged. The cell's output is the last
        run's; the other runs are silent."""
        args = parse_argstring(self.rrto_cell, line)
        if args.repeat < 1 or args.warmup < 0:
            raise UsageError("--repeat must be at least 1 and --warmup at least 0")
        s = self.session or self.open()
        before_mode = s.mode
        reactivate = not s.active
        if args.mode:
            s.set_mode(args.mode)
        runs = []
        try:
            with contextlib.ExitStack() as stack:
                if reactivate:
                    s.activate()
                    stack.callback(s.deactivate)
                total = args.warmup + args.repeat
                for i in range(total):
                    last = i == total - 1
                    runs.append(self._run(s, cell, silent=not last))
                    if not runs[-1]["ok"]:
                        break
        finally:
            if args.mode:
                s.set_mode(before_mode)
        reported = runs[args.warmup:]
        for i, r in enumerate(reported):
            r["run"] = i
        if not args.quiet and reported:
            print(_table(reported, ["run", "ops", "rpcs", "latency_ms", "phase"]))
            engaged = next((r["run"] for r in reported if r["phase"] == "replay"), None)
            print(f"replay engaged at run {engaged}" if engaged is not None else
                  "replay did not engage" + ("" if s.mode == "rrto" else f" (mode {s.mode})"))

    def _run(self, s: Session, cell: str, silent: bool) -> dict[str, Any]:
        before, rows = s.stats(), len(s.telemetry.rows)
        began = time.perf_counter()
        if silent:
            with capture_output():
                result = self.shell.run_cell(cell, store_history=False, silent=True)
        else:
            result = self.shell.run_cell(cell, store_history=False)
        latency = (time.perf_counter() - began) * 1e3
        after = s.stats()
        phases = {r.phase for r in list(s.telemetry.rows)[rows:]}
        return {"ops": after["ops"] - before["ops"], "rpcs": after["rpcs"] - before["rpcs"],
                "latency_ms": latency, "phase": "+".join(sorted(phases)) or "-",
                "ok": result.success}


def load(shell: Any) -> None:
    """``%load_ext rrto``: open the session, activate it, register the magics."""
    magics = Rrto(shell=shell)  # registers itself as a configurable: %config Rrto applies
    try:
        magics.open()
    except BaseException:
        shell.configurables.remove(magics)
        raise
    shell.register_magics(magics)
    shell._rrto_magics = magics


def unload(shell: Any) -> None:
    """``%unload_ext rrto``: close the session (torch restored), remove the magics."""
    magics = getattr(shell, "_rrto_magics", None)
    if magics is None:
        return
    magics.close()
    for kind, name in (("line", "rrto"), ("cell", "rrto")):
        shell.magics_manager.magics[kind].pop(name, None)
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    del shell._rrto_magics
