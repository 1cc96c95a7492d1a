"""A fork server for the documented-commands test: `python doc_zygote.py SOCKET` imports dsvlm's command modules
(torch, transformers, diffusers, accelerate, lmms-eval) once, then runs each `dsvlm ...` the shims send it in a
forked child.

A fresh interpreter spends most of a tiny command's time importing those libraries; the commands themselves run
exactly as `python -m dsvlm` runs them: the real CLI in its own process, with the shim's stdin and stdout, its own
stderr pipe, working directory and environment, and the CLI's exit code. The console script started as a real
process is tested in test_recipe.py::test_the_console_entry_point_as_a_process.

Protocol: the shim sends one JSON message {argv, cwd, env} with three file descriptors (stdin, stdout, stderr)
attached, then reads the exit code as one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import traceback

MAX_MESSAGE = 1 << 20


def preload() -> None:
    """Import what the commands import (nothing that starts threads or touches a device)."""
    import dsvlm.ablate.grid
    import dsvlm.analysis.probe
    import dsvlm.cli.app
    import dsvlm.data.llava
    import dsvlm.data.synthetic
    import dsvlm.diffusion.pretrain
    import dsvlm.evaluation.lmms_model
    import dsvlm.evaluation.runner
    import dsvlm.strip.strip
    import dsvlm.train.loop  # noqa: F401


def run_command(argv: list[str], cwd: str, env: dict[str, str], fds: list[int]) -> None:
    """In the forked child: become the command's process, run the CLI, exit with its code."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["dsvlm", *argv]
    code = 1
    try:
        from dsvlm.cli.app import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_one(conn: socket.socket) -> None:
    with conn:
        message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, 3)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_command(request["argv"], request["cwd"], request["env"], fds)
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())


def main(path: str) -> None:
    preload()
    sys.stdout.flush()
    sys.stderr.flush()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def request(path: str, argv: list[str], stdin: int, stdout: int, stderr: int) -> int:
    """The shim's side: run `dsvlm ARGV` in the server at `path`; returns the exit code."""
    message = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)
        socket.send_fds(conn, [message], [stdin, stdout, stderr])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                raise RuntimeError("the doc-commands fork server closed the connection without an exit code")
            reply += chunk
    return int(reply)


if __name__ == "__main__":
    main(sys.argv[1])
