"""What the tests, the benchmarks and the demo share: a real Synapse to drive, and its database.

* ``harness``: a Synapse process with the module, its users and HTTP requests;
* ``rawdb``: the test server's database read and written behind its back.

Not part of the package (``matrix_leave_forget``) and not installed.
"""
