"""
Test doubles: stand-ins for pager's collaborators that the shipped module never needs.
"""

import sqlite3

from twisted.internet import defer

import pager


class SynchronousPool:
    """
    A stand-in for L{adbapi.ConnectionPool} that runs each interaction at once on the calling thread, for tests that
    drive the server with a fake clock and transport: C{pager.Store(path, pool=SynchronousPool(path))}.  The server
    itself always uses a real pool.
    """

    def __init__(self, path):
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        pager.prepare_connection(self._conn)

    def runInteraction(self, fn, *args, **kwargs):
        conn = self._conn
        conn.execute("BEGIN")
        try:
            result = fn(pager._SyncTransaction(conn), *args, **kwargs)
        except BaseException:
            conn.execute("ROLLBACK")
            return defer.fail()
        conn.execute("COMMIT")
        return defer.succeed(result)

    def runWithConnection(self, fn, *args):
        """C{fn(connection, *args)} outside any transaction (a VACUUM or a checkpoint)."""
        return defer.maybeDeferred(fn, self._conn, *args)

    def start(self):
        pass

    def close(self):
        self._conn.close()


def synchronous_store(path):
    """A L{pager.Store} on a L{SynchronousPool}: every operation has committed when its call returns."""
    return pager.Store(path, pool=SynchronousPool(path))
