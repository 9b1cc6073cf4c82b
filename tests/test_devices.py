"""
Tests for the server's side of devices and prekeys: registering and logging in a device, certifying, publishing and
handing out prekeys, linking and revoking devices, the device coverage of a send, per-device delivery and what a
receipt means with several devices.  Driven like tests.test_server: StringTransport, a synchronous store and a
MemoryReactorClock.  Each attack the new requests open has a test of its own.
"""

from cryptography.hazmat.primitives.asymmetric import x25519
from twisted.internet.address import IPv4Address
from twisted.logger import formatEvent, globalLogPublisher

import pager

from tests.test_server import LOOPBACK, REMOTE, TOKEN, ServerTestCase, b64, private_key, send_fields

CREATED = 1_700_000_000


def did(key):
    return pager.device_id(key)


def x25519_public():
    return pager.x25519_public_bytes(x25519.X25519PrivateKey.generate())


def signed_prekey(device_key, user, prekey_id=7, valid_from=0, valid_until=14 * pager.DAY):
    return pager.sign_prekey(device_key, user, prekey_id, x25519_public(), valid_from, valid_until)


def one_time(first, count):
    return [{"id": first + i, "public": b64(x25519_public())} for i in range(count)]


def seal_to(sender, sender_key, targets, plaintext=b"hello", identity=None, **kwargs):
    """An envelope from C{sender}'s device C{sender_key} to C{targets}: (user, device key or DeviceTarget)."""
    devices = [t if isinstance(t, pager.DeviceTarget)
               else pager.DeviceTarget(t[0], did(t[1]), rsa_key=t[1].public_key()) for t in targets]
    kwargs.setdefault("timestamp_ms", 1000 * 1000)
    return pager.seal(sender_key, sender, devices, plaintext,
                      sender_fingerprint=pager.fingerprint(identity or private_key(sender)), now=1000, **kwargs)


class DeviceTestCase(ServerTestCase):
    """Helpers: link a device to an account, log a device in, publish prekeys."""

    def link(self, user, label, identity=None, name="phone", peer=LOOPBACK):
        """Link C{label}'s key to C{user}'s account through link_request and link_approve; returns the key."""
        key = private_key(label)
        waiting = self.connect(peer)
        link = self.assertOk(waiting.request("link_request", user=user, public_key=pager.public_key_pem(key),
                                             name=name, mac=b64(b"m" * 32)))["link"]
        identity = identity or self.login(user)
        certificate = pager.certify_device(private_key(user), user, key.public_key(), name, CREATED)
        answer = self.assertOk(identity.request("link_approve", link=link, name=name, created=CREATED,
                                                certificate=b64(certificate.signature), answer_mac=b64(b"a" * 32)))
        self.assertEqual(answer["device"], did(key).hex())
        [linked] = waiting.pushed("linked")
        self.assertEqual((linked["link"], linked["device"]["id"], linked["answer_mac"]),
                         (link, did(key).hex(), b64(b"a" * 32)))
        return key

    def login_device(self, user, key, receive=True, conn=None, **extra):
        conn = conn or self.connect()
        proof = pager.sign_auth(key, "login", conn.server_id, user, conn.challenge, pager.fingerprint(key))
        fields = dict(user=user, device=did(key).hex(), proof=b64(proof), receive=receive)
        fields.update(extra)
        return conn, conn.request("login", **fields)

    def device_session(self, user, key, receive=True):
        conn, answer = self.login_device(user, key, receive)
        self.assertOk(answer)
        return conn

    def publish(self, conn, user, key, **fields):
        if "signed" not in fields:
            fields["signed"] = signed_prekey(key, user).to_json()
        return conn.request("publish_prekeys", **fields)


class RegisterLoginTests(DeviceTestCase):

    def test_registerNeedsCertificate(self):
        """register without the device's self-certificate, or with one that does not verify, creates nothing."""
        conn = self.connect()
        key = private_key("alice")
        answer = self.assertError(conn.register("alice", key, device={"name": "laptop"}), "bad_certificate")
        other = pager.certify_device(private_key("mallory"), "alice", key.public_key(), "laptop", CREATED)
        self.assertError(conn.register("alice", key, device={"name": "laptop", "created": CREATED,
                                                             "certificate": b64(other.signature)}),
                         "bad_certificate")
        self.assertIn("message", answer)
        self.assertEqual(self.successResultOf(self.store.user_names()), [])

    def test_loginAnswer(self):
        """login names the device, says it is certified and how many prekeys the server holds for it."""
        self.register("alice").lose()
        conn = self.login("alice")
        self.assertOk(self.publish(conn, "alice", private_key("alice"), one_time=one_time(1, 30)))
        conn2 = self.connect()
        answer = self.assertOk(conn2.login("alice", private_key("alice")))
        self.assertEqual((answer["device"], answer["certified"], answer["prekeys"]),
                         (did(private_key("alice")).hex(), True,
                          {"signed_id": 7, "signed_valid_until": 14 * pager.DAY, "one_time": 30}))

    def test_linkedDeviceLogin(self):
        """A linked device logs in with its own key's proof and no token; with a token it is refused."""
        self.register("alice")
        phone = self.link("alice", "alice-phone")
        _, answer = self.login_device("alice", phone)
        self.assertEqual((answer["type"], answer["device"], answer["certified"]), ("ok", did(phone).hex(), True))
        _, answer = self.login_device("alice", phone, token="correct horse battery staple")
        self.assertError(answer, "bad_request")

    def test_unknownDeviceCharged(self):
        """A login naming an unknown device, or with a proof by another key, is auth_failed, charged to the address."""
        self.register("alice")
        for _ in range(self.limits.address_free_failures):
            _, answer = self.login_device("alice", private_key("mallory"))
            self.assertError(answer, "auth_failed")
        _, answer = self.login_device("alice", private_key("mallory"))
        self.assertError(answer, "rate_limited")


class PrekeyTests(DeviceTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")

    def test_publishChecksSignature(self):
        """A signed prekey signed by another key is bad_certificate; an expired one bad_request; nothing is stored."""
        forged = signed_prekey(private_key("mallory"), "alice")
        forged = pager.SignedPrekey("alice", did(private_key("alice")), forged.prekey_id, forged.public,
                                    forged.valid_from, forged.valid_until, forged.signature)
        self.assertError(self.publish(self.alice, "alice", None, signed=forged.to_json()), "bad_certificate")
        self.clock.advance(15 * pager.DAY)
        self.alice, self.bob = self.login("alice"), self.login("bob")
        self.assertError(self.publish(self.alice, "alice", private_key("alice")), "bad_request")
        self.assertError(self.publish(self.alice, "alice", private_key("alice"),
                                      signed=signed_prekey(private_key("alice"), "alice", valid_from=17 * pager.DAY,
                                                           valid_until=30 * pager.DAY).to_json()), "bad_request")
        answer = self.assertOk(self.bob.request("bundle", users=["alice"]))
        self.assertIsNone(answer["bundles"][0]["devices"][0]["signed_prekey"])

    def test_poolBounded(self):
        """At most 100 one-time prekeys a frame and 200 a device: more is bad_request and stores nothing."""
        key = private_key("alice")
        self.assertError(self.publish(self.alice, "alice", key, one_time=one_time(1, 101)), "bad_request")
        self.assertEqual(self.assertOk(self.publish(self.alice, "alice", key, one_time=one_time(1, 100)))["one_time"],
                         100)
        self.assertEqual(self.assertOk(self.publish(self.alice, "alice", key, one_time=one_time(101, 100)))
                         ["one_time"], 200)
        self.assertError(self.publish(self.alice, "alice", key, one_time=one_time(201, 1)), "bad_request")
        self.assertError(self.publish(self.alice, "alice", key, one_time=[{"id": 0, "public": b64(b"x" * 32)}]),
                         "bad_certificate")

    def test_oneTimePrekeyHandedOutOnce(self):
        """Each bundle takes one one-time prekey per device, never the same twice; below 20 the device is told."""
        self.assertOk(self.publish(self.alice, "alice", private_key("alice"), one_time=one_time(1, 21)))
        self.alice.read()
        seen = []
        for _ in range(21):
            answer = self.assertOk(self.bob.request("bundle", users=["alice"]))
            [device] = answer["bundles"][0]["devices"]
            self.assertEqual(device["signed_prekey"]["id"], 7)
            seen.append(device["one_time_prekey"]["id"])
        self.assertEqual(sorted(seen), list(range(1, 22)))
        answer = self.assertOk(self.bob.request("bundle", users=["alice"]))
        self.assertIsNone(answer["bundles"][0]["devices"][0]["one_time_prekey"])
        self.assertIsNotNone(answer["bundles"][0]["devices"][0]["signed_prekey"])
        low = self.alice.pushed("prekeys_low")
        self.assertEqual([f["one_time"] for f in low], [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2,
                                                        1, 0])

    def test_drainIsRateLimited(self):
        """
        Attack: an account drains another's one-time prekeys with bundle requests.  After a burst of 100 it gets
        rate_limited with retry_after, at bundle_rate a second from then on.
        """
        self.assertOk(self.publish(self.alice, "alice", private_key("alice"),
                                   one_time=one_time(1, 100)))
        self.assertOk(self.publish(self.alice, "alice", private_key("alice"), one_time=one_time(101, 100)))
        for _ in range(pager.BUNDLE_BURST):
            self.assertOk(self.bob.request("bundle", users=["alice"]))
        answer = self.assertError(self.bob.request("bundle", users=["alice"]), "rate_limited")
        self.assertEqual(answer["retry_after"], 1)
        self.clock.advance(1)
        for _ in range(int(self.limits.bundle_rate)):
            self.assertOk(self.bob.request("bundle", users=["alice"]))
        self.assertError(self.bob.request("bundle", users=["alice"]), "rate_limited")
        # 120 taken of 200: the rest is there for everyone else.
        self.assertEqual(self.successResultOf(self.store.device_status("alice", did(private_key("alice"))))[2], 80)

    def test_bundleLeavesOutRequester(self):
        """A bundle for one's own name lists one's other devices, never the requesting one; unknown users fail."""
        phone = self.link("alice", "alice-phone", identity=self.alice)
        answer = self.assertOk(self.alice.request("bundle", users=["alice", "bob"]))
        self.assertEqual([[d["id"] for d in b["devices"]] for b in answer["bundles"]],
                         [[did(phone).hex()], [did(private_key("bob")).hex()]])
        self.assertError(self.alice.request("bundle", users=["nobody"]), "unknown_user")


class LinkTests(DeviceTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")

    def test_linkFlow(self):
        """The identity device sees the request, approves it, and the new device is listed as certified."""
        waiting = self.connect()
        key = private_key("alice-phone")
        link = self.assertOk(waiting.request("link_request", user="alice", public_key=pager.public_key_pem(key),
                                             name="phone", mac=b64(b"m" * 32)))["link"]
        [request] = self.assertOk(self.alice.request("link_pending"))["requests"]
        self.assertEqual((request["link"], request["name"], request["mac"]), (link, "phone", b64(b"m" * 32)))
        certificate = pager.certify_device(private_key("alice"), "alice", key.public_key(), "phone", CREATED)
        self.assertOk(self.alice.request("link_approve", link=link, name="phone", created=CREATED,
                                         certificate=b64(certificate.signature), answer_mac=b64(b"a" * 32)))
        self.assertEqual(len(waiting.pushed("linked")), 1)
        self.assertEqual(self.assertOk(self.alice.request("link_pending"))["requests"], [])
        listing = self.assertOk(self.alice.request("devices", user="alice"))
        self.assertEqual([(d["id"], d["name"], d["revoked"]) for d in listing["devices"]],
                         [(did(private_key("alice")).hex(), "laptop", None), (did(key).hex(), "phone", None)])
        self.assertIn("last_seen", listing["devices"][0])
        # the same connection logs in as the new device
        _, answer = self.login_device("alice", key, conn=waiting)
        self.assertOk(answer)

    def test_forgedCertificateRefused(self):
        """An approval whose certificate is not by the identity key, or for another key, adds nothing."""
        waiting = self.connect()
        key = private_key("alice-phone")
        link = self.assertOk(waiting.request("link_request", user="alice", public_key=pager.public_key_pem(key),
                                             name="phone", mac=b64(b"m" * 32)))["link"]
        forged = pager.certify_device(private_key("mallory"), "alice", key.public_key(), "phone", CREATED)
        self.assertError(self.alice.request("link_approve", link=link, name="phone", created=CREATED,
                                            certificate=b64(forged.signature), answer_mac=b64(b"a" * 32)),
                         "bad_certificate")
        self.assertEqual(waiting.pushed("linked"), [])
        self.assertEqual(len(self.assertOk(self.alice.request("devices", user="alice"))["devices"]), 1)

    def test_linkedDeviceCannotApproveOrRevoke(self):
        """
        Attack: a linked device (or whoever stole it) adds a device of its own, or revokes the others: forbidden.
        """
        phone = self.link("alice", "alice-phone", identity=self.alice)
        conn = self.device_session("alice", phone)
        waiting = self.connect()
        link = self.assertOk(waiting.request("link_request", user="alice",
                                             public_key=pager.public_key_pem(private_key("mallory")), name="evil",
                                             mac=b64(b"m" * 32)))["link"]
        self.assertError(conn.request("link_pending"), "forbidden")
        certificate = pager.certify_device(phone, "alice", private_key("mallory").public_key(), "evil", CREATED)
        self.assertError(conn.request("link_approve", link=link, name="evil", created=CREATED,
                                      certificate=b64(certificate.signature), answer_mac=b64(b"a" * 32)), "forbidden")
        revocation = pager.revoke_device(phone, "alice", did(private_key("alice")), CREATED)
        self.assertError(conn.request("revoke_device", **revocation.to_json()), "forbidden")
        self.assertEqual(len(self.assertOk(self.alice.request("devices", user="alice"))["devices"]), 2)

    def test_requestFloodBounded(self):
        """
        Attack: unauthenticated link requests fill the server's memory or the account's list.  At most 2 wait per
        address and 4 per account (rate_limited past that); unknown users are charged to the requester.
        """
        def request(peer, user="alice", label="mallory"):
            conn = self.connect(peer)
            return conn, conn.request("link_request", user=user, public_key=pager.public_key_pem(private_key(label)),
                                      name="evil", mac=b64(b"m" * 32))

        held = [self.assertOk(request(REMOTE)[1]) for _ in range(2)]
        self.assertError(request(REMOTE)[1], "rate_limited")
        peers = [IPv4Address("TCP", "198.51.100.%d" % n, 1) for n in range(1, 4)]
        held += [self.assertOk(request(peers[0])[1]), self.assertOk(request(peers[1])[1])]
        answer = self.assertError(request(peers[2])[1], "rate_limited")
        self.assertEqual(answer["retry_after"], pager.LINK_TTL)
        self.assertEqual(len(self.factory.links), 4)
        self.assertEqual(len(held), 4)
        # An unknown user costs the requester a failure like a failed login.
        for _ in range(self.limits.address_free_failures):
            self.assertError(request(peers[2], user="nobody")[1], "unknown_user")
        self.assertError(request(peers[2], user="nobody")[1], "rate_limited")

    def test_requestExpires(self):
        """A link request is forgotten after LINK_TTL seconds: its connection gets link_expired; closing drops it."""
        waiting = self.connect()
        self.assertOk(waiting.request("link_request", user="alice",
                                      public_key=pager.public_key_pem(private_key("alice-phone")), name="phone",
                                      mac=b64(b"m" * 32)))
        self.clock.advance(self.limits.login_timeout + 1)  # waiting for the link outlasts the login timeout
        self.assertFalse(waiting.protocol.closed)
        self.clock.advance(pager.LINK_TTL)
        self.assertEqual(len(waiting.pushed("link_expired")), 1)
        self.assertEqual(self.factory.links, {})
        other = self.connect()
        self.assertOk(other.request("link_request", user="alice",
                                    public_key=pager.public_key_pem(private_key("alice-phone")), name="phone",
                                    mac=b64(b"m" * 32)))
        other.lose()
        self.assertEqual(self.factory.links, {})

    def test_deviceLimit(self):
        """An account has at most max_devices devices not revoked: approving one more is forbidden."""
        self.serve(pager.Limits(max_devices=2))
        self.alice = self.login("alice")
        self.link("alice", "alice-phone", identity=self.alice)
        waiting = self.connect()
        key = private_key("alice-tablet")
        link = self.assertOk(waiting.request("link_request", user="alice", public_key=pager.public_key_pem(key),
                                             name="tablet", mac=b64(b"m" * 32)))["link"]
        certificate = pager.certify_device(private_key("alice"), "alice", key.public_key(), "tablet", CREATED)
        self.assertError(self.alice.request("link_approve", link=link, name="tablet", created=CREATED,
                                            certificate=b64(certificate.signature), answer_mac=b64(b"a" * 32)),
                         "forbidden")
        self.assertEqual(self.connect().hello["limits"]["max_devices"], 2)


class RevokeTests(DeviceTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.phone = self.link("alice", "alice-phone", identity=self.alice)

    def revoke(self, device, key=None, at=CREATED + 10):
        revocation = pager.revoke_device(key or private_key("alice"), "alice", device, at)
        return self.alice.request("revoke_device", **revocation.to_json())

    def test_revokedDeviceCannotLogInOrReceive(self):
        """
        Attack: a stolen, revoked device reads on.  Its session ends, its pending deliveries go (the other device
        still has the message), and it cannot log in again.
        """
        conn = self.device_session("alice", self.phone)
        envelope = seal_to("bob", private_key("bob"), [("alice", private_key("alice")), ("alice", self.phone)])
        self.assertOk(self.bob.send(envelope, to=["alice"]))
        self.assertEqual(len(conn.pushed("message")), 1)
        self.assertOk(self.revoke(did(self.phone)))
        self.assertTrue(conn.protocol.closed)
        _, answer = self.login_device("alice", self.phone)
        self.assertError(answer, "auth_failed")
        query = self.store.pool._conn.execute
        self.assertEqual(query("SELECT device FROM deliveries").fetchall(), [(did(private_key("alice")),)])
        self.assertEqual(query("SELECT pending_count FROM users WHERE name = 'alice'").fetchone(), (1,))
        listing = self.assertOk(self.bob.request("devices", user="alice"))["devices"]
        self.assertEqual(listing[1]["revoked"]["at"], CREATED + 10)
        self.assertNotIn("last_seen", listing[1])
        # A message now must leave the revoked device out.
        self.assertError(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice")),
                                                                           ("alice", self.phone)]), to=["alice"]),
                         "devices_changed")
        self.assertOk(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice"))]),
                                    to=["alice"]))

    def test_loginLogNamesDevice(self):
        """
        The server's log says which device logged in (the identity device, or a linked device by name and id), and
        that a failed login was a revoked device's, not an unknown user's; the client still gets only auth_failed.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.login("alice")
        self.device_session("alice", self.phone)
        lines = [formatEvent(e) for e in events]
        self.assertIn("alice logged in from 127.0.0.1:1234 on the identity device %s" % did(private_key("alice")).hex(),
                      lines)
        self.assertIn("alice logged in from 127.0.0.1:1234 on the linked device 'phone' %s" % did(self.phone).hex(),
                      lines)
        self.assertOk(self.revoke(did(self.phone)))
        del events[:]
        _, answer = self.login_device("alice", self.phone)
        self.assertEqual(self.assertError(answer, "auth_failed")["message"], pager.AuthFailed().message)
        [line] = [formatEvent(e) for e in events if "Failed login" in formatEvent(e)]
        self.assertEqual(line, "Failed login for alice from 127.0.0.1:1234: revoked device %s" % did(self.phone).hex())
        del events[:]
        _, answer = self.login_device("alice", private_key("mallory"))
        self.assertError(answer, "auth_failed")
        [line] = [formatEvent(e) for e in events if "Failed login" in formatEvent(e)]
        self.assertEqual(line, "Failed login for alice from 127.0.0.1:1234: unknown device %s"
                         % did(private_key("mallory")).hex())

    def test_lastSeenWholeSeconds(self):
        """last_seen in a devices answer is whole seconds, like created and revoked."""
        self.clock.advance(100.75)
        self.device_session("alice", self.phone).lose()
        self.clock.advance(10.5)
        listing = self.assertOk(self.alice.request("devices", user="alice"))["devices"]
        self.assertEqual([(type(d["last_seen"]), d["last_seen"]) for d in listing], [(int, 111), (int, 100)])

    def test_devicesChangedPushedToOwnSessions(self):
        """
        A device linked or revoked is pushed as devices_changed to every other receiving session of the same user
        (the session that made the change, send-only sessions and other users get nothing: the server does not
        know who a user's contacts are, and telling everyone would tell everyone).
        """
        other = self.login("alice")  # alice's identity device, a second session
        phone = self.device_session("alice", self.phone)
        script = self.device_session("alice", self.phone, receive=False)
        tablet = self.link("alice", "alice-tablet", identity=self.alice, name="tablet")
        expected = [{"type": "devices_changed", "user": "alice"}]
        for conn in (other, phone):
            self.assertEqual(conn.pushed("devices_changed"), expected)
        for conn in (self.alice, script, self.bob):
            self.assertEqual(conn.pushed("devices_changed"), [])
        self.assertOk(self.revoke(did(tablet)))
        for conn in (other, phone):
            self.assertEqual(conn.pushed("devices_changed"), expected)
        for conn in (self.alice, script, self.bob):
            self.assertEqual(conn.pushed("devices_changed"), [])

    def test_revokeChecks(self):
        """A revocation not signed by the identity key, of the identity device, or of an unknown device is refused."""
        self.assertError(self.revoke(did(self.phone), key=private_key("mallory")), "bad_certificate")
        self.assertError(self.revoke(did(private_key("alice"))), "bad_request")
        self.assertError(self.revoke(did(private_key("mallory"))), "bad_request")
        self.assertOk(self.revoke(did(self.phone)))
        self.assertError(self.revoke(did(self.phone)), "bad_request")

    def test_revokedForgotten(self):
        """A revoked device's row is forgotten 30 days after its revocation, at the expiry sweep."""
        self.assertOk(self.revoke(did(self.phone), at=0))
        self.clock.advance(pager.REVOKED_KEPT + 1)
        self.successResultOf(self.factory.expire())
        self.assertEqual(len(self.assertOk(self.login("bob").request("devices", user="alice"))["devices"]), 1)

    def test_rekeyReplacesDevices(self):
        """A rekey leaves the account one device, the new identity device; the linked device's session ends."""
        conn = self.device_session("alice", self.phone)
        new = private_key("alice-new")
        proof_old = pager.sign_auth(private_key("alice"), "rekey", self.server_id, "alice", self.alice.challenge,
                                    pager.fingerprint(new))
        proof_new = pager.sign_auth(new, "rekey", self.server_id, "alice", self.alice.challenge,
                                    pager.fingerprint(new))
        self.assertOk(self.alice.request("rekey", user="alice", public_key=pager.public_key_pem(new),
                                         proof_old=b64(proof_old), proof_new=b64(proof_new),
                                         token="correct horse battery staple"))
        self.assertTrue(conn.protocol.closed)
        listing = self.assertOk(self.bob.request("devices", user="alice"))["devices"]
        self.assertEqual([(d["id"], d["certificate"]) for d in listing], [(did(new).hex(), None)])
        # The re-keyed session is the new identity device: it certifies itself, and sends as it.
        certificate = pager.certify_device(new, "alice", new.public_key(), "laptop", CREATED)
        self.assertOk(self.alice.request("certify", name="laptop", created=CREATED,
                                         certificate=b64(certificate.signature)))
        self.assertOk(self.alice.send(seal_to("alice", new, [("bob", private_key("bob"))], identity=new), to=["bob"]))


class SendCoverageTests(DeviceTestCase):

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.phone = self.link("bob", "bob-phone", identity=self.bob)
        self.bob_devices = [("bob", private_key("bob")), ("bob", self.phone)]

    def test_missingDevice(self):
        """
        Attack: a server-side check of the coverage: an envelope that leaves out one of bob's devices, or adds one
        he does not have, is devices_changed naming bob; stored for nobody.
        """
        answer = self.assertError(self.alice.send(seal_to("alice", private_key("alice"), self.bob_devices[:1])),
                                  "devices_changed")
        self.assertIn("bob", answer["message"])
        self.assertError(self.alice.send(seal_to("alice", private_key("alice"), self.bob_devices + [
            ("bob", private_key("mallory"))])), "devices_changed")
        self.assertEqual(self.store.pool._conn.execute("SELECT COUNT(*) FROM messages").fetchone(), (0,))
        self.assertOk(self.alice.send(seal_to("alice", private_key("alice"), self.bob_devices)))

    def test_noDowngradeToRsa(self):
        """
        Attack: a sender (or a server withholding prekeys) wraps with RSA-OAEP to a device that published prekeys:
        bad_request; the X25519 wrap to its signed prekey is accepted.
        """
        conn = self.device_session("bob", self.phone)
        spk = signed_prekey(self.phone, "bob")
        self.assertOk(self.publish(conn, "bob", self.phone, signed=spk.to_json()))
        answer = self.assertError(self.alice.send(seal_to("alice", private_key("alice"), self.bob_devices)),
                                  "bad_request")
        self.assertIn("downgrade", answer["message"])
        target = pager.DeviceTarget("bob", did(self.phone), signed_prekey=spk)
        self.assertOk(self.alice.send(seal_to("alice", private_key("alice"), [self.bob_devices[0], target])))

    def test_senderDeviceChecked(self):
        """The envelope must name the session's device as its sender, and be signed by that device's key."""
        conn = self.device_session("bob", self.phone)
        # sealed and signed by bob's identity key, sent on the phone's session
        envelope = seal_to("bob", private_key("bob"), [("alice", private_key("alice")), ("bob", self.phone)])
        self.assertError(conn.send(envelope, to=["alice"]), "forbidden")
        # naming the phone as sender, signed by another key
        envelope = seal_to("bob", private_key("bob"), [("alice", private_key("alice")), ("bob", private_key("bob"))],
                           sender_device=did(self.phone))
        self.assertError(conn.send(envelope, to=["alice"]), "bad_request")
        envelope = seal_to("bob", self.phone, [("alice", private_key("alice")), ("bob", private_key("bob"))])
        self.assertOk(conn.send(envelope, to=["alice"]))

    def test_ownDevicesRequired(self):
        """A sender with other devices must include them (devices_changed otherwise), never the sending device."""
        self.assertError(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice"))]),
                                       to=["alice"]), "devices_changed")
        self.assertError(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice"))]
                                               + self.bob_devices), to=["alice"]), "bad_request")
        self.assertOk(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice")),
                                                                        ("bob", self.phone)]), to=["alice"]))

    def test_versionOneRefused(self):
        """A version 1 envelope (one key per user) is refused on send: bad_request."""
        envelope = seal_to("alice", private_key("alice"), self.bob_devices)
        fields = send_fields(envelope)
        header = pager.parse_header(envelope.header)
        self.assertEqual(header.version, 2)
        v1 = self.v1_header(header)
        fields["header"] = b64(v1)
        self.assertError(self.alice.request("send", **fields), "bad_request")

    def v1_header(self, header):
        parts = [pager._lp(pager.ENVELOPE_TAG), pager._lp(header.message_id),
                 header.timestamp_ms.to_bytes(8, "big"), pager._lp(b"alice"), pager._lp(header.sender_fingerprint),
                 pager._lp(b"text"), pager._lp(b""), header.chunk_size.to_bytes(4, "big"), (1).to_bytes(4, "big"),
                 pager._lp(b"bob"), pager._lp(pager.fingerprint(private_key("bob"))), pager._lp(b"w" * 256),
                 pager._lp(header.commitment)]
        return b"".join(parts)


class ReceiptTests(DeviceTestCase):
    """Per-device delivery, and what a user's receipt means."""

    def setUp(self):
        super().setUp()
        self.alice = self.register("alice")
        self.bob = self.register("bob")
        self.phone = self.link("bob", "bob-phone", identity=self.bob)
        self.bob.read()
        self.bob_phone = self.device_session("bob", self.phone)
        self.envelope = seal_to("alice", private_key("alice"), [("bob", private_key("bob")), ("bob", self.phone)])
        self.assertOk(self.alice.send(self.envelope))
        self.msg = pager.parse_header(self.envelope.header).message_id.hex()

    def test_eachDeviceGetsIt(self):
        """Both of bob's devices get the message pushed; the message is stored once."""
        self.assertEqual([f["msg"] for f in self.bob.pushed("message")], [self.msg])
        self.assertEqual([f["msg"] for f in self.bob_phone.pushed("message")], [self.msg])
        query = self.store.pool._conn.execute
        self.assertEqual(query("SELECT COUNT(*) FROM messages").fetchone(), (1,))
        self.assertEqual(query("SELECT pending_count FROM users WHERE name = 'bob'").fetchone(), (1,))

    def test_deliveredAtFirstAck(self):
        """The first device's ack makes alice's one delivered receipt; the second device's ack makes none."""
        self.assertOk(self.bob_phone.request("ack", msg=self.msg))
        [receipt] = self.alice.pushed("receipt")
        self.assertEqual((receipt["msg"], receipt["from"], receipt["status"]), (self.msg, "bob", "delivered"))
        query = self.store.pool._conn.execute
        self.assertEqual(query("SELECT pending_count FROM users WHERE name = 'bob'").fetchone(), (1,))
        self.assertOk(self.bob.request("ack", msgs=[self.msg]))
        self.assertEqual(self.alice.pushed("receipt"), [])
        self.assertEqual(query("SELECT pending_count FROM users WHERE name = 'bob'").fetchone(), (0,))
        self.assertEqual(query("SELECT COUNT(*) FROM messages").fetchone(), (0,))
        # a device acks only its own delivery
        self.assertError(self.bob.request("ack", msg=self.msg), "unknown_message")

    def test_rejectedWhenEveryDeviceRejects(self):
        """One device's reject makes no receipt; the last device's reject, none having acked, makes rejected."""
        self.assertOk(self.bob.request("reject", msg=self.msg, reason="first"))
        self.assertEqual(self.alice.pushed("receipt"), [])
        self.assertOk(self.bob_phone.request("reject", msg=self.msg, reason="second"))
        [receipt] = self.alice.pushed("receipt")
        self.assertEqual((receipt["status"], receipt["reason"]), ("rejected", "second"))

    def test_ackAfterReject(self):
        """A reject by one device then an ack by the other: delivered."""
        self.assertOk(self.bob.request("reject", msg=self.msg, reason="cannot open"))
        self.assertOk(self.bob_phone.request("ack", msg=self.msg))
        self.assertEqual([r["status"] for r in self.alice.pushed("receipt")], ["delivered"])

    def test_expiredOnce(self):
        """An undelivered message expires with one expired receipt for the user, not one per device."""
        self.clock.advance(self.limits.message_expiry + 1)
        self.successResultOf(self.factory.expire())
        self.assertEqual([(r["from"], r["status"]) for r in self.login("alice").pushed("receipt")],
                         [("bob", "expired")])

    def test_noReceiptForOwnDevices(self):
        """bob's copy on his other device is delivered to it, and makes no receipt for bob."""
        envelope = seal_to("bob", self.phone, [("alice", private_key("alice")), ("bob", private_key("bob"))])
        self.assertOk(self.bob_phone.send(envelope, to=["alice"]))
        msg = pager.parse_header(envelope.header).message_id.hex()
        self.assertEqual([f["msg"] for f in self.bob.pushed("message")], [self.msg, msg])
        self.assertOk(self.bob.request("ack", msg=msg))
        self.assertEqual(self.bob_phone.pushed("receipt"), [])
        self.assertOk(self.alice.request("ack", msg=msg))
        self.assertEqual([(r["from"], r["status"]) for r in self.bob_phone.pushed("receipt")],
                         [("alice", "delivered")])

    def test_revokeSettlesWithoutReceipt(self):
        """The phone is revoked after the laptop rejected: the message leaves bob's counts, with no receipt."""
        self.assertOk(self.bob.request("reject", msg=self.msg, reason="no"))
        revocation = pager.revoke_device(private_key("bob"), "bob", did(self.phone), CREATED)
        self.assertOk(self.bob.request("revoke_device", **revocation.to_json()))
        query = self.store.pool._conn.execute
        self.assertEqual(query("SELECT pending_count, pending_bytes FROM users WHERE name = 'bob'").fetchone(), (0, 0))
        self.assertEqual(query("SELECT COUNT(*) FROM messages").fetchone(), (0,))
        self.assertEqual(self.alice.pushed("receipt"), [])


class LegacyDeviceTests(DeviceTestCase):
    """An account made before devices (as a server upgrade leaves it): its identity device has no certificate."""

    def setUp(self):
        super().setUp()
        key = private_key("alice")
        salt = b"s" * pager.ARGON2_SALT_SIZE
        self.successResultOf(self.store.add_user("alice", pager.public_key_pem(key), pager.fingerprint(key), salt,
                                                 pager.hash_token(TOKEN, salt), 0))
        self.bob = self.register("bob")

    def test_certify(self):
        """The legacy device logs in uncertified, is RSA-wrapped to, then certifies itself once."""
        conn = self.connect()
        answer = self.assertOk(conn.login("alice", private_key("alice")))
        self.assertEqual((answer["certified"], answer["prekeys"]["signed_id"]), (False, None))
        self.assertOk(self.bob.send(seal_to("bob", private_key("bob"), [("alice", private_key("alice"))]),
                                    to=["alice"]))
        forged = pager.certify_device(private_key("mallory"), "alice", private_key("alice").public_key(), "laptop",
                                      CREATED)
        self.assertError(conn.request("certify", name="laptop", created=CREATED, certificate=b64(forged.signature)),
                         "bad_certificate")
        certificate = pager.certify_device(private_key("alice"), "alice", private_key("alice").public_key(),
                                           "laptop", CREATED)
        fields = dict(name="laptop", created=CREATED, certificate=b64(certificate.signature))
        self.assertEqual(self.assertOk(conn.request("certify", **fields))["device"], did(private_key("alice")).hex())
        self.assertError(conn.request("certify", **fields), "bad_request")
        self.assertTrue(self.assertOk(self.connect().login("alice", private_key("alice")))["certified"])
        self.assertEqual(self.assertOk(self.bob.request("devices", user="alice"))["devices"][0]["name"], "laptop")


class DeviceCacheTests(DeviceTestCase):

    def test_sendReadsNoDevices(self):
        """A send to users whose device sets the server holds reads none from the store."""
        alice, bob = self.register("alice"), self.register("bob")
        reads = []
        devices = self.store.devices
        self.store.devices = lambda user: reads.append(user) or devices(user)
        self.factory.forget_devices(["alice", "bob"])
        for n in range(3):
            self.assertOk(alice.send(seal_to("alice", private_key("alice"), [("bob", private_key("bob"))],
                                             b"%d" % n)))
        self.assertEqual(sorted(reads), ["alice", "bob"])  # the first send only
        self.assertEqual(len(bob.pushed("message")), 3)
