"""The /capabilities rewrite (MSC4267): what is appended, and what is left alone."""

import json

from twisted.trial.unittest import TestCase

from matrix_leave_forget._synapse.capabilities import ForgetOnLeaveSettings
from matrix_leave_forget.http.capabilities import STABLE, UNSTABLE, with_forget_on_leave

ON = ForgetOnLeaveSettings(enabled=True, unstable=False)


class WithForgetOnLeaveTests(TestCase):
    def test_appended_inside_capabilities(self) -> None:
        """The member goes at the end of `capabilities`; Synapse's bytes before it stay."""
        body = b'{"capabilities":{"m.change_password":{"enabled":true}}}'
        self.assertEqual(
            with_forget_on_leave(body, ON),
            b'{"capabilities":{"m.change_password":{"enabled":true},'
            b'"m.forget_forced_upon_leave":{"enabled":true}}}',
        )

    def test_empty_capabilities(self) -> None:
        """No comma before the only member."""
        off = ForgetOnLeaveSettings(enabled=False, unstable=False)
        self.assertEqual(
            with_forget_on_leave(b'{"capabilities":{}}', off),
            b'{"capabilities":{"m.forget_forced_upon_leave":{"enabled":false}}}',
        )

    def test_unstable_only_when_synapse_would(self) -> None:
        """With Synapse's MSC4267 flag both names are there; one Synapse wrote stays as is."""
        both = ForgetOnLeaveSettings(enabled=True, unstable=True)
        out = with_forget_on_leave(b'{"capabilities":{"a":{}}}', both)
        assert out is not None
        self.assertEqual(list(json.loads(out)["capabilities"]), ["a", STABLE, UNSTABLE])
        body = b'{"capabilities":{"%s":{"enabled":false}}}' % UNSTABLE.encode()
        out = with_forget_on_leave(body, both)
        assert out is not None
        caps = json.loads(out)["capabilities"]
        self.assertEqual(caps, {UNSTABLE: {"enabled": False}, STABLE: {"enabled": True}})

    def test_left_alone(self) -> None:
        """Not JSON, not a capabilities object, or the name already there: unchanged."""
        for body in (
            b"",
            b"[1]",
            b'{"errcode":"M_UNKNOWN"}',
            b'{"capabilities":[]}',
            b'{"capabilities":{"m.forget_forced_upon_leave":{"enabled":false}}}',
        ):
            self.assertIsNone(with_forget_on_leave(body, ON), body)

    def test_other_layouts_reencoded(self) -> None:
        """An answer with whitespace or another last member is re-encoded, still valid."""
        for body in (b'{"capabilities": {"a": 1} }\n', b'{"capabilities":{"a":1},"x":2}'):
            out = with_forget_on_leave(body, ON)
            assert out is not None
            data = json.loads(out)
            self.assertEqual(data["capabilities"], {"a": 1, STABLE: {"enabled": True}})
