"""The payment notification endpoint WeChat Pay POSTs to (the unified order's notify_url).

Thin: it reads the body, at most one byte past the cap, and answers what notifications.py decides.
"""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .notifications import MAX_NOTIFICATION_BYTES, handle_payment_notification

__all__ = ["payment_notification"]


@csrf_exempt  # WeChat's server posts signed XML; it has no CSRF token, and the signature is the check
# Under ATOMIC_REQUESTS too, each write commits at once: the per-minute count of a flood must not hold its row
# locked for a whole request, and a payment's own transaction is notifications.py's.
@transaction.non_atomic_requests
@require_POST
def payment_notification(request: HttpRequest) -> HttpResponse:
    """Answer WeChat's payment result notification with its SUCCESS or FAIL XML (always HTTP 200)."""
    # Not request.body: that reads up to DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) before anything is refused.
    body = request.read(MAX_NOTIFICATION_BYTES + 1)
    # REMOTE_ADDR, never X-Forwarded-For: any client can write that header.
    result = handle_payment_notification(body, client_address=request.META.get("REMOTE_ADDR") or "")
    return HttpResponse(result.reply, content_type="text/xml; charset=utf-8")
