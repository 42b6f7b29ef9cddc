"""The erasure receipt's shape (no Synapse)."""

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.retention.receipt import (
    KEPT_ROOM_ID_ROWS,
    build_receipt,
    decode_receipt,
    encode_receipt,
    media_view,
    receipt_view,
)


class ReceiptTests(SynchronousTestCase):
    def test_counts_media_zero_and_kept_tables(self) -> None:
        """A receipt has the footprint, media counters at 0 under 'keep', and the kept tables."""
        receipt = build_receipt(27, 11, {"threads": 1, "current_state_delta_stream": 14})
        self.assertEqual((receipt["events"], receipt["state_groups"]), (27, 11))
        self.assertEqual(receipt["media"]["policy"], "keep")
        self.assertEqual(
            {k: v for k, v in receipt["media"].items() if k != "policy"},
            dict.fromkeys(
                (
                    "local_items",
                    "local_bytes",
                    "remote_items",
                    "remote_bytes",
                    "kept_referenced_elsewhere",
                    "kept_encrypted_room",
                ),
                0,
            ),
        )
        self.assertEqual(receipt["kept"], dict(KEPT_ROOM_ID_ROWS))
        self.assertEqual(
            list(receipt["leftovers_cleared"]), ["current_state_delta_stream", "threads"]
        )

    def test_media_counts_carried_when_given(self) -> None:
        """Media counts given (media deletion, later) land in the same fields."""
        receipt = build_receipt(1, 1, {}, {"local_items": 3, "local_bytes": 4096}, "delete")
        self.assertEqual(receipt["media"]["local_items"], 3)
        self.assertEqual(receipt["media"]["policy"], "delete")

    def test_encoding_is_canonical_and_round_trips(self) -> None:
        """The stored form is compact with sorted keys, and decodes to the same object."""
        receipt = build_receipt(None, None, {})
        text = encode_receipt(receipt)
        self.assertNotIn(" ", text)
        self.assertEqual(decode_receipt(text), receipt)
        self.assertIsNone(decode_receipt("not json"))
        self.assertIsNone(decode_receipt(None))

    def test_view_of_an_entry_without_a_receipt(self) -> None:
        """A purge recorded before receipts: the entry is named, the receipt is None."""
        view = receipt_view({"seq": 5, "ts": 1, "hash": "h", "receipt": None})
        self.assertEqual(view, {"seq": 5, "ts": 1, "hash": "h", "receipt": None})
        self.assertIsNone(receipt_view(None))

    def test_media_view_follows_the_media_decisions(self) -> None:
        """Beside the purge receipt: None without media decisions, pending (undecided, then
        due with the last due time), the media_deleted entry once written, or no_media."""
        self.assertIsNone(media_view(None, None))
        self.assertEqual(
            media_view(("waiting", 0, None), None),
            {"state": "pending", "due": None, "due_at": None},
        )
        self.assertEqual(
            media_view(("scheduled", 2, 9000), None), {"state": "pending", "due": 2, "due_at": 9000}
        )
        self.assertEqual(media_view(("reported", 0, None), None), {"state": "no_media"})
        entry = {"seq": 9, "ts": 5, "hash": "m", "receipt": '{"media":{"remote_items":1}}'}
        self.assertEqual(
            media_view(("reported", 0, None), entry),
            {
                "state": "recorded",
                "seq": 9,
                "ts": 5,
                "hash": "m",
                "receipt": {"media": {"remote_items": 1}},
            },
        )
