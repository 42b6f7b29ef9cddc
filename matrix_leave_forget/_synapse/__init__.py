"""The one place where matrix-leave-forget reaches past Synapse's public ModuleApi.

Everything else in the package uses ``synapse.module_api`` only. Each reach in
this package says why the public API is not enough, so that a Synapse upgrade
that breaks one of them breaks it here, visibly, and nowhere else. One file per
concern:

* ``contexts``: logcontexts and background processes (who a callback runs for);
* ``new_events``: every new event, observed outside its request's logcontext;
* ``persist_hook``: rows written in the transaction that persists events (a
  served leave's entry);
* ``internals``: the handlers, HTTP plumbing, identity and tables a leave needs;
* ``forget``: Synapse's forget rows and cache invalidations, and who still has a
  room (the "forgotten by all" rule), in our transactions;
* ``routes``: every route of leave and forget (Synapse's forget taken over);
* ``history``: cached membership lookups and stream tokens for the history guard;
* ``routing``: which servlet Synapse routes a client request to (the guard's classification);
* ``responses``: holding back Synapse's answer until the guard or the capability has seen it;
* ``purge_tasks``: where Synapse's purge of a room stands;
* ``leftovers``: what Synapse's room purge leaves behind (threads, state deltas);
* ``media``: the room's media in Synapse's tables and media repository, which process
  deletes it and the worker lock it deletes under;
* ``erasure``: which users Synapse erased (GDPR), for their audit text;
* ``listeners``: the live HTTP listeners, for the mount checks;
* ``capabilities``: the forget-on-leave settings ``/capabilities`` advertises;
* ``offline_config``: Synapse's readers of homeserver.yaml, for the CLI;
* ``sql``: the limits and membership values the queries share.
"""
