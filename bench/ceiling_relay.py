"""
The ceiling for bench/relay.py: the plainest Twisted JSON-lines relay.  No pager code, no storage, no crypto.

Receivers send {"type":"login","user":NAME}.  Any frame with a "to" member is forwarded, as the same line, to the
connection logged in as that user, and answered with {"type":"ok","id":...}; any other frame is answered the same
way, except that a list-form ack ({"type":"ack","msgs":[...]}) is answered {"type":"ok","id":...,"unknown_msgs":[]}
and a cumulative one ({"type":"ack","upto":N}) {"type":"ok","id":...,"settled":0}, as pager answers them (it holds
nothing to settle).  Listens on 127.0.0.1 only, and stops by itself after --max-seconds.

    python bench/ceiling_relay.py --port 5099
"""

import argparse
import json

from twisted.internet import protocol, reactor
from twisted.protocols.basic import LineReceiver


class Relay(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.user = None

    def lineReceived(self, line):
        frame = json.loads(line)
        answer = {"type": "ok", "id": frame.get("id")}
        kind = frame.get("type")
        if kind == "login":
            self.user = frame["user"]
            self.factory.users[self.user] = self
        elif "to" in frame:
            peer = self.factory.users.get(frame["to"])
            if peer is not None:
                peer.sendLine(line)
        elif kind == "ack":
            if "msgs" in frame:
                answer["unknown_msgs"] = []
            elif "upto" in frame:
                answer["settled"] = 0
        self.sendLine(json.dumps(answer, separators=(",", ":")).encode())

    def connectionLost(self, reason):
        if self.user is not None and self.factory.users.get(self.user) is self:
            del self.factory.users[self.user]


class RelayFactory(protocol.Factory):
    protocol = Relay

    def __init__(self):
        self.users = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop after this long (default 1800)")
    args = parser.parse_args()
    reactor.listenTCP(args.port, RelayFactory(), backlog=4096, interface="127.0.0.1")
    reactor.callLater(args.max_seconds, reactor.stop)
    reactor.run()


if __name__ == "__main__":
    main()
