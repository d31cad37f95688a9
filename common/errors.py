"""Typed exceptions. Every failure a user can cause maps to one of these, with a message naming the problem."""


class FedsiloError(Exception):
    """Base class of all fedsilo errors; the CLI turns these into a message and a non-zero exit."""


class ConfigError(FedsiloError):
    """A configuration value is missing, unknown or out of range (the message names the key)."""


class DataError(FedsiloError):
    """A data file or data source is missing, unreadable or unusable."""


class ModelError(FedsiloError):
    """The model cannot be resolved or built, or client and server disagree about it."""


class ParameterMismatchError(FedsiloError):
    """Exchanged arrays do not match the model's trainable tensors (count, shape or dtype)."""


class PrivacyError(FedsiloError):
    """Base class for privacy failures; these always fail closed."""


class LedgerError(PrivacyError):
    """A privacy ledger is unreadable, corrupted, or belongs to another site or budget."""


class LedgerBehindEgressError(LedgerError):
    """A ledger shows less epsilon spent than the site's hash-chained egress log recorded when it sent: charges
    were removed or rewritten (its checksum recomputed), or an older copy was restored; the site refuses it."""


class BudgetExhaustedError(PrivacyError):
    """Training the requested round would exceed the site's privacy budget."""


class SecureAggregationError(PrivacyError):
    """An update cannot be represented exactly by SecAgg+ (it would be clipped) or SecAgg+ is required but absent."""


class PolicyError(PrivacyError):
    """A job asks for something the site's own policy does not allow (unapproved app, too many rounds or too much
    epsilon, an unpinned server); the site refuses it."""


class EgressLogError(PrivacyError):
    """A site's egress log cannot be written, or the one on disk is torn, edited or truncated."""


class InvalidUpdateError(FedsiloError):
    """A model update is unusable (wrong arrays, not finite, or over the norm bound); it is never sent or applied."""


class JobEndedEarlyError(FedsiloError):
    """Too few departments could train for `max-idle-rounds` rounds in a row: the job stops."""


class JobInterruptedError(FedsiloError):
    """`server run` got SIGINT or SIGTERM while it followed a job, and stopped the job on the server (or says why it
    could not); the command exits 128 + the signal's number, as a shell reports a command a signal ended."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class JoinError(FedsiloError):
    """`fedsilo client start` cannot join the coordination server: wrong CA, a server that does not speak TLS (or a
    site set to plaintext facing a TLS server), a node key the server has not registered, or a node the server still
    sees online. The message names the site, what happened and what to do."""
