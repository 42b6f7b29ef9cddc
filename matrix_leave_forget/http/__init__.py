"""The HTTP side: the client resource (leave, forget, the guarded reads) and the admin API."""
