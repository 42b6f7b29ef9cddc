"""The rules of leave and forget, and every other route by which a member departs."""
