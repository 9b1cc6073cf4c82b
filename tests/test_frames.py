"""
Tests for pager's "Frames" section: encode_frame, decode_frame, request_id, the field helpers, and
request_id_of_raw (how the server reads the id of a frame that failed validation).
"""

import base64

from twisted.trial.unittest import SynchronousTestCase

import pager


def b64(data):
    return base64.b64encode(data).decode("ascii")


class EncodeFrameTests(SynchronousTestCase):
    """encode_frame writes one line of compact ASCII JSON."""

    def test_compactAscii(self):
        """A frame is encoded without spaces and with non-ASCII text escaped."""
        self.assertEqual(pager.encode_frame({"type": "ok", "id": 1, "text": "caf\u00e9"}),
                         b'{"type":"ok","id":1,"text":"caf\\u00e9"}')

    def test_noDelimiterInside(self):
        """A newline inside a string never reaches the encoded line, so one frame is always one line."""
        line = pager.encode_frame({"type": "ok", "text": "a\nb\r\n"})
        self.assertNotIn(b"\n", line)
        self.assertNotIn(b"\r", line)

    def test_roundTrip(self):
        """decode_frame gives back exactly the frame that encode_frame encoded."""
        frame = {"type": "message_chunk", "id": "r-1", "n": -(2 ** 53), "x": [1.5, None, True, {"k": "\u2603"}]}
        self.assertEqual(pager.decode_frame(pager.encode_frame(frame)), frame)

    def test_constantsRefused(self):
        """NaN and the infinities cannot be encoded, since they are not JSON."""
        for value in (float("nan"), float("inf"), float("-inf")):
            self.assertRaises(ValueError, pager.encode_frame, {"type": "ok", "x": value})


    def test_sendAnswerBuiltByHand(self):
        """
        The answer to a send, built by hand on the hot path, is byte for byte the line encode_frame makes of the
        same frame, whatever its request id (an integer, a string that needs escaping, none), whether it was a
        duplicate, and whoever it was queued for.
        """
        for rid in (1, -(2 ** 53), 2 ** 53, 'quote " back \\ caf\u00e9 \u2028', "", None):
            for duplicate in (True, False):
                for queued in ([], ["bob", "carol"]):
                    for accepted_at in (1764512345.125, 1764512345):
                        fields = {"msg": "ab" * 16, "accepted_at": accepted_at, "duplicate": duplicate,
                                  "queued": queued}
                        frame = dict({"type": "ok", "id": rid}, **fields)
                        self.assertEqual(pager._send_ok_line(rid, fields), pager.encode_frame(frame) + b"\n")

class DecodeFrameTests(SynchronousTestCase):
    """decode_frame accepts only a UTF-8 JSON object with a valid type, and says why otherwise."""

    def assertRefused(self, line, words):
        """decode_frame raises BadRequest (never anything else) with a message containing C{words}."""
        try:
            pager.decode_frame(line)
        except pager.BadRequest as e:
            self.assertIn(words, e.message, line[:60])
            self.assertEqual(e.code, "bad_request")
        else:
            self.fail("decode_frame accepted %r" % (line[:60],))

    def test_valid(self):
        """A JSON object with a lower-case type is returned as a dict."""
        self.assertEqual(pager.decode_frame(b'{"type": "ping", "id": 7}'), {"type": "ping", "id": 7})

    def test_bytesLike(self):
        """A bytearray or memoryview line is decoded like bytes."""
        line = b'{"type":"ping","id":"a"}'
        self.assertEqual(pager.decode_frame(bytearray(line)), {"type": "ping", "id": "a"})
        self.assertEqual(pager.decode_frame(memoryview(line)), {"type": "ping", "id": "a"})

    def test_invalidUTF8(self):
        """A line that is not UTF-8 (a stray byte, an overlong form, an encoded surrogate) is refused."""
        for line in (b'{"type":"ping","x":"\xff"}', b'{"type":"ping","x":"\xc0\xaf"}',
                     b'{"type":"ping","x":"\xed\xa0\x80"}', b'{"type":"ping","x":"\xe2\x82"}'):
            self.assertRefused(line, "UTF-8")

    def test_invalidJSON(self):
        """Text that is not exactly one JSON value is refused."""
        for line in (b"", b" ", b"{", b'{"type":"ping",}', b"{'type':'ping'}", b'{"type":"ping"} x',
                     b'{"type":"ping"}{"type":"ping"}', b'{"type":"ping","x":01}', b'{"type":ping}'):
            self.assertRefused(line, "JSON")

    def test_constantsRefused(self):
        """NaN, Infinity and -Infinity, which Python's json accepts by default, are refused."""
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            self.assertRefused(b'{"type":"ping","id":1,"x":' + constant + b"}", "JSON")
            self.assertRefused(b'{"type":"ping","id":1,"x":[' + constant + b"]}", "JSON")

    def test_notAnObject(self):
        """A JSON value that is not an object is refused."""
        for line in (b"[]", b'[{"type":"ping"}]', b'"x"', b"1", b"1.5", b"null", b"true"):
            self.assertRefused(line, "object")

    def test_invalidType(self):
        """A frame without a type, or whose type is not a short lower-case word, is refused."""
        for line in (b"{}", b'{"id":1}', b'{"type":null}', b'{"type":1}', b'{"type":""}', b'{"type":"Ping"}',
                     b'{"type":"ping!"}', b'{"type":" ping"}', b'{"type":"_ping"}', b'{"type":["ping"]}',
                     b'{"type":"p' + b"a" * 32 + b'"}', b'{"type":"pi\\u0000ng"}'):
            self.assertRefused(line, "type")

    def test_longestType(self):
        """A type of 32 characters of a-z and '_' is accepted."""
        kind = "message_chunk" + "x" * 19
        self.assertEqual(pager.decode_frame(pager.encode_frame({"type": kind})), {"type": kind})

    def test_deepNesting(self):
        """Deeply nested arrays or objects are refused with BadRequest instead of escaping as RecursionError."""
        for line in (b"[" * 100000, b"[" * 100000 + b"]" * 100000, b'{"a":' * 100000,
                     b'{"type":"ping","x":' + b"[" * 100000 + b"]" * 100000 + b"}"):
            self.assertRaises(pager.BadRequest, pager.decode_frame, line)

    def test_hugeIntegers(self):
        """A 5000-digit integer, alone or as a field, is refused with BadRequest."""
        digits = b"1" * 5000
        self.assertRaises(pager.BadRequest, pager.decode_frame, digits)
        self.assertRaises(pager.BadRequest, pager.decode_frame, b'{"type":"ping","id":' + digits + b"}")
        self.assertRaises(pager.BadRequest, pager.decode_frame, b'{"type":"ping","id":1,"n":' + digits + b"}")


    def test_duplicateMembers(self):
        """
        An object that names a member twice is refused with BadRequest naming it, at the top level and nested (the
        control: the same frames without the repetition are accepted).
        """
        self.assertRefused(b'{"type":"send","to":["eve"],"to":["bob"]}', 'repeats the member "to"')
        self.assertRefused(b'{"type":"ping","type":"ping"}', 'repeats the member "type"')
        self.assertRefused(b'{"type":"ping","x":[{"a":1,"b":2,"a":3}]}', 'repeats the member "a"')
        self.assertEqual(pager.decode_frame(b'{"type":"send","to":["bob"]}'), {"type": "send", "to": ["bob"]})
        self.assertEqual(pager.decode_frame(b'{"type":"ping","x":[{"a":1,"b":2}]}'),
                         {"type": "ping", "x": [{"a": 1, "b": 2}]})


class RequestIdTests(SynchronousTestCase):
    """request_id accepts strings of at most 64 characters and integers JSON carries exactly."""

    def test_integers(self):
        """Integers from -2**53 to 2**53 are request ids; larger ones are not."""
        for rid in (0, 7, -1, 2 ** 53, -(2 ** 53)):
            self.assertEqual(pager.request_id({"id": rid}), rid)
        for rid in (2 ** 53 + 1, -(2 ** 53) - 1, 10 ** 100):
            self.assertIsNone(pager.request_id({"id": rid}))

    def test_strings(self):
        """Strings of at most 64 characters are request ids, whatever the characters."""
        for rid in ("", "abc", "x" * 64, "\u00e9" * 64):
            self.assertEqual(pager.request_id({"id": rid}), rid)

    def test_longString(self):
        """A string of 65 characters is not a request id."""
        self.assertIsNone(pager.request_id({"id": "x" * 65}))

    def test_booleans(self):
        """true and false are not request ids, although Python counts them as integers."""
        self.assertIsNone(pager.request_id({"id": True}))
        self.assertIsNone(pager.request_id({"id": False}))

    def test_floats(self):
        """Floats, even whole ones, are not request ids."""
        for rid in (1.0, 1.5, float("inf")):
            self.assertIsNone(pager.request_id({"id": rid}))

    def test_otherValues(self):
        """A missing id, null, a list or an object is not a request id."""
        self.assertIsNone(pager.request_id({}))
        for rid in (None, [1], {"id": 1}):
            self.assertIsNone(pager.request_id({"id": rid}))


class RawRequestIdTests(SynchronousTestCase):
    """request_id_of_raw reads the id of a line that decode_frame refused, when it can."""

    def test_readable(self):
        """The id of a JSON object that fails validation (no type, or NaN inside) is still read."""
        self.assertEqual(pager.request_id_of_raw(b'{"id":7}'), 7)
        self.assertEqual(pager.request_id_of_raw(b'{"type":"ping","id":"r","x":NaN}'), "r")

    def test_unreadable(self):
        """Lines that are not UTF-8, not JSON, too deep, too big or not an object give None."""
        for line in (b'{"id":1,"x":"\xff"}', b'{"id":1', b"[" * 100000, b'{"id":' + b"1" * 5000 + b"}",
                     b"[1]", b'{"id":true}'):
            self.assertIsNone(pager.request_id_of_raw(line))


class FieldTests(SynchronousTestCase):
    """The field helpers return a checked value or raise BadRequest naming the field."""

    def assertField(self, helper, frame, *args, **kwargs):
        """C{helper} refuses C{frame} with a BadRequest that names the field."""
        e = self.assertRaises(pager.BadRequest, helper, frame, *args, **kwargs)
        self.assertIn('"%s"' % args[0], e.message)

    def test_str(self):
        """field_str takes a string up to its length, a default when optional, and nothing else."""
        self.assertEqual(pager.field_str({"s": "abc"}, "s", 3), "abc")
        self.assertEqual(pager.field_str({}, "s", 3, required=False, default="d"), "d")
        self.assertEqual(pager.field_str({"s": None}, "s", 3, required=False), None)
        for frame in ({}, {"s": None}, {"s": 1}, {"s": ["a"]}, {"s": "abcd"}, {"s": True}):
            self.assertField(pager.field_str, frame, "s", 3)
        self.assertField(pager.field_str, {"s": 5}, "s", 3, required=False)

    def test_int(self):
        """field_int takes an integer in range and refuses booleans, floats, strings and out-of-range values."""
        self.assertEqual(pager.field_int({"n": 0}, "n", 0, 10), 0)
        self.assertEqual(pager.field_int({"n": 10}, "n", 0, 10), 10)
        self.assertEqual(pager.field_int({}, "n", 0, 10, required=False, default=3), 3)
        for frame in ({}, {"n": -1}, {"n": 11}, {"n": True}, {"n": False}, {"n": 1.0}, {"n": "1"}, {"n": None}):
            self.assertField(pager.field_int, frame, "n", 0, 10)

    def test_bool(self):
        """field_bool takes true or false, the default when the field is absent, and nothing else."""
        self.assertIs(pager.field_bool({"b": False}, "b", True), False)
        self.assertIs(pager.field_bool({}, "b", True), True)
        for frame in ({"b": 1}, {"b": 0}, {"b": "true"}, {"b": None}):
            self.assertField(pager.field_bool, frame, "b", True)

    def test_b64(self):
        """field_b64 decodes strict standard base64 and refuses anything else."""
        self.assertEqual(pager.field_b64({"p": b64(b"\xfb\xff")}, "p", 10), b"\xfb\xff")
        self.assertEqual(pager.field_b64({"p": ""}, "p", 10), b"")
        self.assertIsNone(pager.field_b64({}, "p", 10, required=False))
        for frame in ({}, {"p": None}, {"p": 5}, {"p": [b64(b"x")]}, {"p": "not base64!"}, {"p": "-_8="},
                      {"p": "QUJD\nREVG"}, {"p": "QUJDRA"}, {"p": "QUJDRA==="}, {"p": " QUJD"}):
            self.assertField(pager.field_b64, frame, "p", 10)

    def test_b64MaxBytes(self):
        """field_b64 takes exactly max_bytes bytes and refuses one byte more."""
        self.assertEqual(pager.field_b64({"p": b64(b"x" * 4)}, "p", 4), b"x" * 4)
        self.assertField(pager.field_b64, {"p": b64(b"x" * 5)}, "p", 4)
        self.assertField(pager.field_b64, {"p": b64(b"x" * 1025)}, "p", 1024)

    def test_b64List(self):
        """field_b64_list decodes a list of base64 strings, empty when absent, and refuses anything else."""
        self.assertEqual(pager.field_b64_list({"c": [b64(b"a"), b64(b"bc")]}, "c", 2, 10), [b"a", b"bc"])
        self.assertEqual(pager.field_b64_list({}, "c", 2, 10), [])
        for frame in ({"c": "x"}, {"c": None}, {"c": {"a": 1}}, {"c": [b64(b"a")] * 3}, {"c": [5]},
                      {"c": ["***"]}, {"c": [b64(b"x" * 13)]}):
            self.assertField(pager.field_b64_list, frame, "c", 2, 10)

    def test_b64ListMaxBytes(self):
        """field_b64_list refuses an item of one byte more than max_bytes."""
        self.assertEqual(pager.field_b64_list({"c": [b64(b"x" * 4)]}, "c", 2, 4), [b"x" * 4])
        self.assertField(pager.field_b64_list, {"c": [b64(b"x" * 5)]}, "c", 2, 4)

    def test_username(self):
        """field_username folds ASCII case and refuses invalid or non-ASCII names."""
        self.assertEqual(pager.field_username({"user": "Alice.B-2_"}), "alice.b-2_")
        self.assertEqual(pager.field_username({"user": "a" * 32}), "a" * 32)
        for name in ("", "a" * 33, "-a", ".a", "_a", "a b", "a/b", "\u212aelvin", "\u00e5sa", "a\n", 5, None):
            self.assertRaises(pager.BadRequest, pager.field_username, {"user": name})

    def test_usernames(self):
        """field_usernames folds and sorts names and refuses empty, overlong, duplicate or invalid lists."""
        self.assertEqual(pager.field_usernames({"to": ["Carol", "bob"]}, "to"), ["bob", "carol"])
        for value in ([], "bob", None, ["bob", "Bob"], ["bob", 5], ["u%d" % i for i in range(65)]):
            self.assertRaises(pager.BadRequest, pager.field_usernames, {"to": value}, "to")
        self.assertEqual(len(pager.field_usernames({"to": ["u%d" % i for i in range(64)]}, "to")), 64)
