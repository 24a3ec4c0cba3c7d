"""rrto_lab: the kernel side of rrto (interception, session, sequence search, client)."""
