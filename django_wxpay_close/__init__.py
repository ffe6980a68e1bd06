"""Close unpaid WeChat Pay Global orders from Django, with a full audit trail."""

__version__ = "0.1.0"
