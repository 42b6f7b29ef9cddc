"""Start a local Synapse with matrix-leave-forget and show leave and forget working.

Run through scripts/demo.sh. Synapse keeps running (Ctrl-C stops it) unless
--exit is given.
"""

import argparse
import json
import os
import socket
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.support.harness import SynapseProcess, quote_room  # noqa: E402


def show(step: str, status: int, body: object) -> None:
    print(f"  {step:<58} -> {status} {json.dumps(body)}")


class _DemoSynapse(SynapseProcess):
    """The harness's Synapse, on the client port asked for (if any)."""

    def __init__(self, port: "int | None", workdir: str) -> None:
        self._fixed_port = port
        super().__init__({"mount": "intercept"}, workdir=workdir, database="sqlite")
        if port is not None:
            self.client_port = port
            self.reconfigure()

    def reassign_ports(self) -> None:
        super().reassign_ports()
        if self._fixed_port is not None:
            self.client_port = self._fixed_port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli_command() -> str:
    """The CLI as it can be typed from here: the venv's script, which is not on PATH."""
    path = os.path.join(os.path.dirname(sys.executable), "matrix-leave-forget")
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--exit", action="store_true", help="stop Synapse after the demo")
    parser.add_argument("--dir", default="demo", help="where config, database and logs go")
    parser.add_argument(
        "--port", type=int, help="Synapse's client port on 127.0.0.1 (default: a free one)"
    )
    args = parser.parse_args()
    if args.port is not None and not _port_is_free(args.port):
        print(
            f"demo: port {args.port} on 127.0.0.1 is in use; pick another --port", file=sys.stderr
        )
        return 2

    workdir = os.path.abspath(args.dir)
    os.makedirs(workdir, exist_ok=True)
    for leftover in ("homeserver.db", "homeserver.db-wal", "homeserver.db-shm"):
        if os.path.exists(os.path.join(workdir, leftover)):
            os.remove(os.path.join(workdir, leftover))
    hs = _DemoSynapse(args.port, workdir)
    print(f"Starting Synapse with matrix-leave-forget (config: {hs.config_path})")
    hs.start()
    try:
        alice = hs.register("alice", admin=True)
        bob = hs.register("bob")
        room = hs.create_room(alice, preset="public_chat", name="Demo room")
        hs.membership(bob, room, "join")
        print(f"Synapse is up on http://127.0.0.1:{hs.client_port}")
        print(f"  alice (admin) and bob are in {room}\n")

        base = f"/_matrix/client/v3/rooms/{quote_room(room)}"
        message = {"msgtype": "m.text", "body": "Good night, bob"}
        sent = hs.client(
            "PUT", f"{base}/send/m.room.message/demo1", message, token=alice.access_token
        )
        earlier = urllib.parse.quote(sent.body["event_id"], safe="")
        resp = hs.client("POST", f"{base}/forget", token=bob.access_token)
        show("bob forgets while joined (refused, as the spec says)", resp.status, resp.body)
        resp = hs.client("POST", f"{base}/leave", {"reason": "Off to bed"}, token=bob.access_token)
        show("bob leaves with a reason", resp.status, resp.body)
        event = hs.member_event(alice, room, bob.user_id) or {}
        show("bob's membership event", 200, event.get("content"))
        message = {"msgtype": "m.text", "body": "bob has gone"}
        hs.client("PUT", f"{base}/send/m.room.message/demo2", message, token=alice.access_token)
        resp = hs.client("GET", f"{base}/messages?dir=f", token=bob.access_token)
        chunk = resp.body.get("chunk", [])
        bodies = [e["content"]["body"] for e in chunk if "body" in e["content"]]
        show("bob pages forward: nothing sent after he left", resp.status, bodies)
        resp = hs.client("POST", f"{base}/forget", token=bob.access_token)
        show("bob forgets the room", resp.status, resp.body)
        resp = hs.client("GET", f"{base}/messages", token=bob.access_token)
        show("bob reads the history afterwards", resp.status, resp.errcode)
        resp = hs.client("GET", f"{base}/context/{earlier}", token=bob.access_token)
        show("bob reads an old message's context (Synapse: 200)", resp.status, resp.errcode)

        resp = hs.client(
            "GET", "/_synapse/client/leave_forget/v1/admin/audit", token=alice.access_token
        )
        print("\nThe module's audit log (admin API), each entry hash-chained and signed:")
        for entry in resp.body["entries"]:
            print(
                f"  #{entry['seq']} {entry['action']:<7} {entry['user_id']} "
                f"outcome={entry['outcome']} reason={entry['reason']!r} "
                f"hash={entry['hash'][:16]}…"
            )
        print(
            f"\nVerify it offline: {_cli_command()} -c {hs.config_path} verify\nLogs: {hs.log_path}"
        )
        if args.exit:
            return 0
        print("\nSynapse keeps running; Ctrl-C stops it.")
        while hs.process is not None and hs.process.poll() is None:
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        hs.stop()


if __name__ == "__main__":
    sys.exit(main())
