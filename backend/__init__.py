"""The EX-4D backend service: a ZeroMQ ROUTER (``server``) running jobs (``workers``) from a bounded queue
(``jobs``) with results kept on disk (``store``); ``parallel`` runs the ex4d generator over several GPUs.

Start it with ``ex4d serve``; talk to it with :class:`ex4d.protocol.Client`.
"""
