"""The site service: one federated master for every user and cluster of a site (issue #17; docs/site.md).

``dxflow site serve`` runs it as the service account ``dxflow``, never root. Users' commands talk to
it instead of a per-user master when ``/etc/dxflow/dxflow.toml`` sets ``site``; agents reach it by
dialling out to its gateway, so no node opens a port and no user's SSH key is used. Replicas share
their state through PostgreSQL; one replica may keep it in SQLite.

Modules, one concern each:

- ``config``   ``/etc/dxflow/site.toml``: listeners, state and publish folders, database, clusters
- ``admin``    ``dxflow site init`` (keys, certificate, folders; as root), ``serve``, ``status``
- ``store``    the shared state: agents, one-time claims, and other modules' tables (SQLite or PostgreSQL)
- ``query``    one user's jobs on one cluster, asked in a child process with that cluster's environment
- ``scope``    whose agents a request sees: job names with their cluster, the policy's defaults
- ``fleet``    every user's agents as the master's relay sees them, each request's user's only
- ``gateway``  the agents' dial-out: enrollment by MUNGE credential from the prolog, channels to agents
- ``users``    who asks (MUNGE on the user API, the console's session) and what they may do (admins)
- ``sessions`` console sessions, login tokens and tickets in the store, valid on every replica
- ``console``  the web console on ``console_listen``
- ``client``   the CLI's side: :class:`~dxflow.site.client.SiteClient`, what every command talks to
- ``app``      the HTTP app: the master's relay and extensions, served by the site's fleet
- ``server``   gunicorn, one worker with threads, the gateway and the fleet's loop in it
"""
