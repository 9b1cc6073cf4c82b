"""
Loss accounting under load: a short run of bench/load.py's scenario against a real server in this process, over
loopback TCP.  Clients send to each other while some disconnect (cleanly or with a reset) and reconnect at random;
nothing accepted may be lost, nothing may be shown twice, and the server must hold nothing at the end.
"""

import importlib.util
import os

from twisted.internet import reactor
from twisted.trial import unittest

import pager

LOAD_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "load.py")


def load_module():
    spec = importlib.util.spec_from_file_location("pager_bench_load", LOAD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LoadTests(unittest.TestCase):
    timeout = 60

    async def start_server(self):
        options = pager.ServerOptions()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--db", self.mktemp()])
        server = self.server = pager.makeService(options, reactor)
        server.startService()
        self.addCleanup(server.stopService)
        port = await server.ready
        return "tcp:127.0.0.1:%d" % port.getHost().port

    def counters_disagree(self, txn):
        """The users whose pending counters differ from the deliveries actually stored for them."""
        return txn.execute(
            "SELECT u.name, u.pending_count, u.pending_bytes, COUNT(m.seq), COALESCE(SUM(m.size), 0) FROM users u"
            " LEFT JOIN deliveries d ON d.recipient = u.name LEFT JOIN messages m ON m.seq = d.seq GROUP BY u.name"
            " HAVING u.pending_count != COUNT(m.seq) OR u.pending_bytes != COALESCE(SUM(m.size), 0)").fetchall()

    async def test_no_loss_under_random_disconnects(self):
        """
        6 clients send to random others for 3 seconds while one is dropped every 50-300 ms: every accepted message
        is shown exactly once to each recipient and acknowledged, and the server holds nothing at the end: every
        user's pending counters match the deliveries stored, and no delivery, message or chunk is left.
        """
        load = load_module()
        address = await self.start_server()
        result = await load.run_load(reactor, address, clients=6, seconds=3.0, seed=20240611, drain_timeout=20.0)
        summary = "\n".join(result.lines())
        self.assertGreater(result.accepted, 20, summary)
        self.assertGreater(result.disconnects, 3, summary)
        self.assertEqual(result.send_errors, [], summary)
        self.assertTrue(result.drained, summary)
        self.assertEqual(result.unresolved, 0, summary)
        self.assertEqual(result.lost, 0, summary)
        self.assertEqual(result.shown_twice, 0, summary)
        self.assertEqual(result.unexpected, 0, summary)
        self.assertEqual(result.delivered, result.expected, summary)
        self.assertEqual(result.acked, result.expected, summary)
        self.assertEqual(result.pending_after, 0, summary)
        self.assertEqual(result.rejected, 0, summary)
        self.assertTrue(result.ok, summary)
        self.assertEqual(await self.server.store.pool.runInteraction(self.counters_disagree), [], summary)
        for table in ("deliveries", "messages", "chunks"):  # everything was delivered and acknowledged
            self.assertEqual(await self.server.store.pool.runInteraction(
                lambda txn: txn.execute("SELECT COUNT(*) FROM %s" % table).fetchall()), [(0,)], (table, summary))
