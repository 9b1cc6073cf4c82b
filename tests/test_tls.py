"""
TLS on loopback: a real pager server serving TLS (``--tls-cert``/``--tls-key``), reached by real clients through
L{pager.Session} (as the command-line client does) or L{pager.PagerClient}.  What is checked: a trusted certificate
works end to end; an untrusted, expired or wrongly named certificate is refused with a sentence that says which;
plain and TLS clients at the wrong kind of port learn it at once; TLS 1.1 and older are refused; C{make-cert}
writes what a client can verify; a server listening on every interface without TLS warns about it.
"""

import datetime
import ipaddress
import io
import os
import select
import socket
import stat
import time

from cryptography import x509
from twisted.internet import reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

import pager
from tests.test_cli import CLITestCase
from tests.test_e2e import key, token

FAST = 2.0  # seconds within which a client must learn that it used the wrong kind of port

_CERTS = {}


def certificate(hostname, **kwargs):
    """C{(cert_pem, key_pem)} from L{pager.make_certificate}, made once per distinct set of arguments."""
    index = (hostname, tuple(sorted(kwargs.items())))
    if index not in _CERTS:
        _CERTS[index] = pager.make_certificate(hostname, [ipaddress.ip_address("127.0.0.1")], **kwargs)
    return _CERTS[index]


def two_years_ago():
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=730)


class TLSTestCase(CLITestCase):
    """Helpers: certificate files, a TLS server, and Sessions configured like the command line's."""

    def write_certificate(self, hostname="localhost", **kwargs):
        """Write a certificate and its key into a new directory; returns C{(cert_path, key_path)}."""
        cert_pem, key_pem = certificate(hostname, **kwargs)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        pager.write_private_file(key_path, key_pem)
        return cert_path, key_path

    async def start_tls_server(self, hostname="localhost", **kwargs):
        """A server serving TLS with a certificate for C{hostname}: returns C{(server, port, cert_path)}."""
        cert_path, key_path = self.write_certificate(hostname, **kwargs)
        options = pager.ServerOptions()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert_path,
                              "--tls-key", key_path, "--db", self.mktemp()])
        self.assertTrue(options["listen"].startswith("ssl:0:"), options["listen"])
        server = pager.makeService(options, reactor)
        server.startService()
        self.addCleanup(self.stop_server, server)
        port = await server.ready
        return server, port.getHost().port, cert_path

    async def start_plain_server(self):
        server, address = await self.start_server()
        return server, server.port.getHost().port

    def session(self, port, tls, ca=None, user="alice", host="localhost", home=None):
        """A Session as the command-line client makes it (no prompts), for C{user} at C{host:port}."""
        token_file = os.path.abspath(self.mktemp())
        with open(token_file, "w") as f:
            f.write(token(user) + "\n")
        os.chmod(token_file, 0o600)  # a token file others may read is refused
        config = {"server": "%s:%d" % (host, port), "home": home or self.home(), "user": user,
                  "token-file": token_file, "passphrase-file": None, "no-passphrase": True, "tls": tls, "ca": ca,
                  "no-history": False, "register": True}
        session = pager.Session(reactor, config, pager.Prompter(reactor, interactive=False, out=io.StringIO()))
        self.addCleanup(session.close)
        return session

    async def refused(self, session):
        """Connect C{session}, which must fail with a NetworkError; returns C{(sentence, seconds taken)}."""
        started = reactor.seconds()
        with self.assertRaises(pager.NetworkError) as caught:
            client = await session.connect()
            self.addCleanup(client.close)
        elapsed = reactor.seconds() - started
        sentence = caught.exception.message
        self.assertNotIn("\n", sentence)
        self.assertEqual(pager.exit_code(caught.exception), pager.EXIT_NETWORK)
        return sentence, elapsed


class TrustedCertificateTests(TLSTestCase):

    async def test_register_and_send_over_tls(self):
        """
        With --tls --ca cert.pem, alice's Session connects to localhost, makes her key and registers; bob, another
        TLS client, registers too; alice's message reaches bob, verified.  The server saw both as TLS connections.
        """
        server, port, cert_path = await self.start_tls_server()
        alice = self.session(port, tls=True, ca=cert_path)
        await alice.start()
        self.assertEqual(alice.client.user, "alice")
        self.assertTrue(os.path.exists(alice.key_path))

        endpoint = pager.client_endpoint(reactor, "localhost", port, tls=True, ca=cert_path)
        bob = await pager.PagerClient.connect(endpoint, reactor)
        self.addCleanup(bob.close)
        received = []
        bob.on_message = received.append
        await bob.register("bob", token("bob"), key("bob"))

        msg = await alice.client.send("bob", "over TLS")
        await self.wait_for(lambda: received, "bob's message over TLS")
        [message] = received
        self.assertEqual((message.message_id.hex(), message.sender, message.plaintext), (msg, "alice", b"over TLS"))
        transports = [p.transport for p in server.factory.protocols]
        self.assertEqual(len(transports), 2)
        for transport in transports:
            self.assertTrue(pager.interfaces.ISSLTransport.providedBy(transport), transport)
        await self.offline(server, alice.client, bob)


class RefusedCertificateTests(TLSTestCase):
    """Certificates a client must not accept, each refused with a sentence that tells the user which problem it is."""

    async def test_untrusted_without_ca(self):
        """Without --ca, a self-signed certificate is checked against the system's trust store and refused."""
        server, port, cert_path = await self.start_tls_server()
        sentence, _ = await self.refused(self.session(port, tls=True))
        self.assertIn("not trusted", sentence)
        self.assertIn("--ca", sentence)
        await self.wait_for(lambda: not server.factory.protocols, "the refused connection to be gone")

    async def test_wrong_host_name(self):
        """
        A certificate made for otherhost, trusted with --ca, is refused when connecting to localhost, with a
        sentence about the host name that does not claim the certificate is untrusted.
        """
        server, port, cert_path = await self.start_tls_server("otherhost")
        sentence, _ = await self.refused(self.session(port, tls=True, ca=cert_path))
        self.assertIn("not valid for the host name localhost;", sentence)  # the name, not a Python repr
        self.assertNotIn("DNS", sentence)
        self.assertNotIn("not trusted", sentence)

    async def test_another_ca(self):
        """
        With --ca naming another certificate, the sentence says the certificate is not that file's, instead of
        telling the user to pass --ca, which they did.
        """
        server, port, cert_path = await self.start_tls_server()
        other, _ = self.write_certificate(days=30)  # another key, made for the same name
        sentence, _ = await self.refused(self.session(port, tls=True, ca=other))
        self.assertIn("not the certificate in the CA file %s" % other, sentence)
        self.assertNotIn("pass the certificate", sentence)

    async def test_ca_file_not_a_certificate(self):
        """A --ca file with no PEM certificate in it is a local file this machine cannot use (exit 7), said plainly."""
        _, port, cert_path = await self.start_tls_server()
        not_pem = os.path.abspath(self.mktemp())
        with open(not_pem, "w") as f:
            f.write("just some text\n")
        with self.assertRaises(pager.LocalError) as caught:
            await self.session(port, tls=True, ca=not_pem).connect()
        self.assertEqual(caught.exception.message, "Cannot use the CA file %s: it holds no certificate in PEM form "
                         "(a block that begins '-----BEGIN CERTIFICATE-----')." % not_pem)
        self.assertEqual(pager.exit_code(caught.exception), pager.EXIT_LOCAL)

    async def test_expired(self):
        """A certificate that expired (valid for one day, two years ago) is refused with a sentence saying so."""
        server, port, cert_path = await self.start_tls_server(now=two_years_ago(), days=1)
        sentence, _ = await self.refused(self.session(port, tls=True, ca=cert_path))
        self.assertIn("expired", sentence)


class ServerCertificateOptionTests(TLSTestCase):
    """A server given a certificate and key it cannot serve says so in the options the operator typed."""

    def test_key_of_another_certificate(self):
        cert_path, _ = self.write_certificate()
        _, other_key = self.write_certificate(days=30)  # another key pair
        options = pager.ServerOptions()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert_path,
                                  "--tls-key", other_key, "--db", self.mktemp()])
        self.assertEqual(str(caught.exception), "--tls-cert %s and --tls-key %s cannot be served: the key is not "
                         "the certificate's." % (cert_path, other_key))

    def test_key_not_pem(self):
        cert_path, _ = self.write_certificate()
        not_pem = os.path.abspath(self.mktemp())
        with open(not_pem, "w") as f:
            f.write("not a key\n")
        options = pager.ServerOptions()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--tls-cert", cert_path,
                                  "--tls-key", not_pem, "--db", self.mktemp()])
        self.assertIn("--tls-key %s cannot be served: is each a PEM file" % not_pem, str(caught.exception))
        self.assertNotIn("ssl:", str(caught.exception))


class WrongPortTests(TLSTestCase):
    """A client that gets TLS wrong learns it in one sentence, at once, not after a timeout."""

    async def test_plain_client_at_tls_port(self):
        """A client without --tls at a TLS port is told, within 2 s, to use --tls."""
        server, port, cert_path = await self.start_tls_server()
        sentence, elapsed = await self.refused(self.session(port, tls=False))
        self.assertIn("--tls", sentence)
        self.assertLess(elapsed, FAST)

    async def test_tls_client_at_plain_port(self):
        """A client with --tls at a plain port is told, within 2 s, that the server does not speak TLS there."""
        cert_path, _ = self.write_certificate()
        server, port = await self.start_plain_server()
        sentence, elapsed = await self.refused(self.session(port, tls=True, ca=cert_path))
        self.assertIn("does not speak TLS", sentence)
        self.assertLess(elapsed, FAST)


def _only_context(cert_pem=None, key_pem=None, method="TLSv1_1_METHOD", ciphers="DEFAULT"):
    """
    A pyOpenSSL context that speaks only C{method} and offers only C{ciphers} (an OpenSSL cipher string), at security
    level 0 so that OpenSSL 3 may offer TLS 1.1.
    """
    from OpenSSL import SSL, crypto
    context = SSL.Context(getattr(SSL, method))
    context.set_cipher_list(ciphers.encode("ascii") + b":@SECLEVEL=0")
    if cert_pem is not None:
        context.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem))
        context.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem))
    return context


def _can_speak_tls11():
    """Whether the local OpenSSL can complete a TLS 1.1 handshake with itself (in memory)."""
    from OpenSSL import SSL
    try:
        cert_pem, key_pem = certificate("localhost")
        server = SSL.Connection(_only_context(cert_pem, key_pem), None)
        server.set_accept_state()
        client = SSL.Connection(_only_context(), None)
        client.set_connect_state()
    except (AttributeError, ValueError, SSL.Error):
        return False
    for _ in range(20):
        done = 0
        for conn, peer in ((client, server), (server, client)):
            try:
                conn.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return False
            try:
                data = conn.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                peer.bio_write(data)
        if done == 2:
            return client.get_protocol_version_name() == "TLSv1.1"
    return False


def _handshake(port, method="TLSv1_1_METHOD", ciphers="DEFAULT"):
    """
    A TLS handshake with 127.0.0.1:PORT offering only C{method} and C{ciphers}: None if it completed, else the error.
    """
    from OpenSSL import SSL
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    try:
        conn = SSL.Connection(_only_context(method=method, ciphers=ciphers), sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(b"localhost")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                select.select([sock], [], [], 0.1)
                continue
            except SSL.WantWriteError:
                select.select([], [sock], [], 0.1)
                continue
            except (SSL.Error, OSError) as e:
                return repr(e)
            return None
        return "no answer within 5 s"
    finally:
        sock.close()


class ProtocolVersionTests(TLSTestCase):

    async def test_tls11_refused(self):
        """
        A client that offers only TLS 1.1 cannot complete a handshake with the server, while the same client code
        offering only TLS 1.2 can (the control).
        """
        if not _can_speak_tls11():
            raise unittest.SkipTest("The local OpenSSL cannot complete a TLS 1.1 handshake even with itself, so it "
                                    "cannot offer TLS 1.1 to the server.")
        server, port, cert_path = await self.start_tls_server()
        failure = await threads.deferToThread(_handshake, port, "TLSv1_1_METHOD")
        self.assertIsNotNone(failure, "the server completed a TLS 1.1 handshake")
        self.assertIn("SSL", failure)
        self.assertIsNone(await threads.deferToThread(_handshake, port, "TLSv1_2_METHOD"))
        await self.wait_for(lambda: not server.factory.protocols, "the refused connection to be gone")


class CipherSuiteTests(TLSTestCase):

    async def test_tls12_only_ecdhe_with_aead(self):
        """
        A TLS 1.2 client offering only static-RSA key exchange (with GCM or CBC), or ECDHE with a CBC cipher, cannot
        complete a handshake; one offering only ECDHE with AES-GCM, or only ECDHE with ChaCha20-Poly1305, can.
        """
        server, port, cert_path = await self.start_tls_server()
        for refused in ("AES128-GCM-SHA256", "AES256-SHA", "AES128-SHA256", "ECDHE-RSA-AES128-SHA",
                        "ECDHE-RSA-AES256-SHA384"):
            failure = await threads.deferToThread(_handshake, port, "TLSv1_2_METHOD", refused)
            self.assertIsNotNone(failure, "the server completed a TLS 1.2 handshake with %s" % refused)
            self.assertIn("SSL", failure)
        for accepted in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"):
            self.assertIsNone(await threads.deferToThread(_handshake, port, "TLSv1_2_METHOD", accepted), accepted)
        await self.wait_for(lambda: not server.factory.protocols, "the test connections to be gone")


class MakeCertTests(TLSTestCase):

    async def test_certificate_is_not_a_ca(self):
        """
        make_certificate's certificate says it is not a CA (BasicConstraints ca false, no certificate signing in its
        key usage), and a client still pins it with --ca: it connects and reads the server's hello.
        """
        cert_path, _ = self.write_certificate()
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.assertIs(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca, False)
        self.assertIs(cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign, False)
        server, port, cert_path = await self.start_tls_server()
        endpoint = pager.client_endpoint(reactor, "localhost", port, tls=True, ca=cert_path)
        client = await pager.PagerClient.connect(endpoint, reactor)
        self.addCleanup(client.close)
        self.assertEqual(client.server_id, server.factory.server_id)

    async def test_make_cert_command(self):
        """
        'pager.py make-cert localhost --ip 127.0.0.1 --out DIR' writes cert.pem, whose subjectAltName lists
        DNS:localhost and IP 127.0.0.1, and key.pem (mode 0600) holding the certificate's private key.
        """
        out = os.path.abspath(self.mktemp())
        result = await self.run_command("make-cert", "localhost", "--ip", "127.0.0.1", "--out", out, home=self.home())
        self.assertExit(result, 0)
        with open(os.path.join(out, "cert.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(names.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("127.0.0.1")])
        key_path = os.path.join(out, "key.pem")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        from cryptography.hazmat.primitives import serialization
        with open(key_path, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), None)
        self.assertEqual(pager.fingerprint(private), pager.fingerprint(cert.public_key()))


class PlainTextWarningTests(unittest.TestCase):
    """A server reachable from the network without TLS says so in its log; a loopback-only server does not."""

    async def warnings_logged(self, listen):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        options = pager.ServerOptions()
        options.parseOptions(["--listen", listen, "--db", self.mktemp()])
        server = pager.makeService(options, reactor)
        server.startService()
        try:
            await server.ready
        finally:
            await server.stopService()
        return [formatEvent(e) for e in events if e.get("log_level") is not None
                and e["log_level"].name in ("warn", "error", "critical")]

    async def test_warning_on_all_interfaces(self):
        """Listening on 0.0.0.0 without TLS logs a warning containing 'without TLS'."""
        warnings = await self.warnings_logged("tcp:0")
        self.assertTrue([w for w in warnings if "without TLS" in w], warnings)

    async def test_no_warning_on_loopback(self):
        """Listening on 127.0.0.1 without TLS logs no such warning."""
        warnings = await self.warnings_logged("tcp:0:interface=127.0.0.1")
        self.assertEqual([w for w in warnings if "without TLS" in w], [])
