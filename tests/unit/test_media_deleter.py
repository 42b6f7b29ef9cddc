"""Which process deletes purged rooms' media (docs/workers.md "Media")."""

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget._synapse.media import is_media_deleter


class MediaDeleterRuleTest(SynchronousTestCase):
    def test_only_a_process_with_the_media_store_deletes(self) -> None:
        """No media store (the main process with enable_media_repo: false): never,
        even if media_instance_running_background_jobs names it."""
        self.assertFalse(is_media_deleter(False, None, "master"))
        self.assertFalse(is_media_deleter(False, "master", "master"))

    def test_the_named_media_instance_deletes(self) -> None:
        """media_instance_running_background_jobs set: that instance and no other,
        whichever else holds a media store (the main process next to a media worker)."""
        self.assertTrue(is_media_deleter(True, "media1", "media1"))
        self.assertFalse(is_media_deleter(True, "media1", "master"))
        self.assertFalse(is_media_deleter(True, "media1", "media2"))

    def test_unnamed_every_media_store_may_delete(self) -> None:
        """Unset: a single process, or each media-store holder (one at a time, under
        the lock)."""
        self.assertTrue(is_media_deleter(True, None, "master"))
        self.assertTrue(is_media_deleter(True, None, "media1"))
