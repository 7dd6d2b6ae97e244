"""Postfix as a way in, beside the SMTP front end: a read-only milter (reception) and a mail
log follower (delivery outcomes). Both produce schema events onto the same raw topic, with
the same spool, as the front end."""

from mailmeta.ingest.postfix._run import run_maillog, run_milter
from mailmeta.ingest.postfix.maillog import MaillogFollower
from mailmeta.ingest.postfix.milter import MilterServer

__all__ = ["MaillogFollower", "MilterServer", "run_maillog", "run_milter"]
