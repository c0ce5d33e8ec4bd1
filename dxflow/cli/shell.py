"""``dxflow shell JOB[:NODE] [-- CMD ARGS…]``: an interactive shell (or CMD with a terminal) on a node of a job."""

from __future__ import annotations

import argparse

from dxflow.errors import EXIT_CONNECTION_LOST as LOST
#: seconds between checks of the window size, besides SIGWINCH
RESIZE_POLL = 0.5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shell", help="open an interactive shell on a node of a job", description=(
        "Open your login shell on NODE (default: the job's first node) of JOB, as you, in the job's "
        "environment and work dir, through the agent of that node. Your terminal is put in raw mode "
        "and its size follows your window; Ctrl-C and friends go to the remote program. With standard "
        "input not a terminal, the input is typed into the remote terminal and Ctrl-D is sent at its end. "
        "With `-- CMD ARGS…`, runs that command with the terminal instead, as `ssh -t node CMD` does (the "
        "words joined by spaces and given to your shell's -c). "
        "Exits with the shell's (or CMD's) exit code (255 if the connection is lost)."))
    p.add_argument("target", metavar="JOB[:NODE]", help="the job (and node), or a node where one job of yours runs")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                   help="a command to run with the terminal instead of your login shell (like ssh -t node CMD)")
    p.set_defaults(func=cmd_shell)


def cmd_shell(args: argparse.Namespace) -> int:
    import json
    import os
    import select
    import signal
    import sys
    import termios
    import tty
    import urllib.parse

    from dxflow.cli import targets
    from dxflow.cli.service import service
    from dxflow.edge.wsclient import HandshakeRejected, WebSocketClient
    from dxflow.errors import DxflowError, UsageError
    from dxflow.master.client import raise_for_status

    targets.parse(args.target, several=False, command="shell")  # exit 2 before anything is contacted
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    line = " ".join(words)  # as ssh joins its command words: the remote shell parses them
    if words and not line.strip():
        raise UsageError("the command after -- is empty")
    client = service().ensure()
    job, node = targets.one(client, args.target, "shell")
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    interactive = os.isatty(stdin)
    size_fd = stdin if interactive else stdout
    size = terminal_size(size_fd)
    cols, rows = size

    sock = client.socket(timeout=60)
    ws = WebSocketClient(sock)
    try:
        query = urllib.parse.urlencode({"cols": cols, "rows": rows, **({"command": line} if words else {})})
        target = client.agent_path(job, node, f"/api/shell?{query}")
        ws.handshake(target, headers=client.auth_headers("GET", target))  # the site's proof of the user
    except HandshakeRejected as e:
        sock.close()
        raise_for_status(e.status, e.body)  # the agent's or master's own error
        raise DxflowError(str(e)) from e
    sock.settimeout(None)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    # SIGWINCH says at once when the window changes; a poll covers a terminal that is not our controlling
    # one (`su -c`, `runuser -c` start the command in a new session, and SIGWINCH never comes).
    poll = RESIZE_POLL if os.isatty(size_fd) else None

    def on_winch(signum, frame):
        try:
            os.write(wake_w, b"w")
        except OSError:
            pass

    def on_term(signum, frame):
        raise SystemExit(128 + signum)  # leave through the finally below: the terminal is restored

    saved = termios.tcgetattr(stdin) if interactive else None
    old_handlers = {s: signal.signal(s, h) for s, h in ((signal.SIGWINCH, on_winch), (signal.SIGTERM, on_term),
                                                       (signal.SIGHUP, on_term))}
    exit_code = None
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        reading = [ws, wake_r, stdin]
        while True:
            ready, _, _ = select.select(reading, [], [], poll)
            if wake_r in ready:
                os.read(wake_r, 512)
            if poll is not None and (now := terminal_size(size_fd)) != size:
                size = now
                ws.send(json.dumps({"resize": list(size)}))
            if stdin in ready:
                data = os.read(stdin, 65536)
                if data:
                    ws.send(data)
                else:  # end of piped input: Ctrl-D, as a user at the terminal would type
                    ws.send(b"\x04")
                    reading.remove(stdin)
            if ws in ready:
                for message in ws.receive():
                    if message[0] == "binary":
                        write_all(stdout, message[1])
                    elif message[0] == "text":
                        news = control(message[1])
                        if "exit" in news:
                            exit_code = news["exit"]
                        if "error" in news:  # \r: the terminal may be raw
                            write_all(sys.stderr.fileno(), f"dxflow: {news['error']}\r\n".encode())
                    else:
                        raise _Closed()
    except _Closed:
        pass
    except OSError as e:
        if exit_code is None:
            raise DxflowError(f"shell connection failed: {e}") from e
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        ws.close()
        os.close(wake_r)
        os.close(wake_w)
    if exit_code is None:
        print(f"dxflow: the connection to the shell on {args.target} was lost", file=sys.stderr)
        return LOST
    return exit_code


class _Closed(Exception):
    """The WebSocket has closed."""


def terminal_size(fd: int) -> tuple[int, int]:
    import os

    try:
        size = os.get_terminal_size(fd)
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    except OSError:
        pass
    return 80, 24


def control(text: str) -> dict:
    """What a control message from the agent says: ``{"exit": code}`` and/or ``{"error": message}``."""
    import json

    try:
        message = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(message, dict):
        return {}
    news = {}
    if isinstance(message.get("exit"), int):
        news["exit"] = message["exit"]
    if "error" in message:
        news["error"] = str(message.get("message") or message["error"])
    return news


def write_all(fd: int, data: bytes) -> None:
    import os

    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
