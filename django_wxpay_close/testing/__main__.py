"""Run the WeChat Pay simulator in the foreground: `python -m django_wxpay_close.testing [--port 8765] ...`.

With no --merchant it knows the demo merchant (appid wx2421b1c4370ec43b, mch_id 10000100, sub_mch_id 20000200,
key TESTKEY0TESTKEY1TESTKEY2TESTKEY3). It creates one unpaid demo order and prints a ready-to-run, correctly
signed `curl` command that closes it, so a hand-made request needs no signing code.

Run this way it treats an order it was never told about as unpaid (`--unknown-orders open`, the default here):
a separate process has no way to learn the orders of the shop that talks to it, so the admin walkthrough's
"Close selected orders" would otherwise answer ORDERNOTEXIST for every order. `--unknown-orders not_exist`
answers as WeChat does for an order it never saw. (`WeChatPaySimulator` itself defaults to not_exist: tests
tell it their orders.)

`--notify URL` plays WeChat's other side instead: it POSTs one correctly signed payment result notification to
the shop's notify URL (loopback only), prints the answer and a `curl` that sends the same body again, and exits 0
when the shop answered SUCCESS, 1 otherwise (2 for bad arguments or a URL it refuses).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from ..wechat import CLOSEORDER_PATH, CloseOrderClient, InvalidXMLBody, Merchant, SignType, decode_xml
from .simulator import API_KEY, APPID, MCH_ID, SUB_MCH_ID, WeChatPaySimulator

DEMO_OUT_TRADE_NO = "DEMO-ORDER-1"
_UNKNOWN_ORDERS_MEANING: dict[str, str] = {
    "open": "any other order is unpaid: its first close answers SUCCESS, later ones ORDERCLOSED",
    "not_exist": "any other order answers ORDERNOTEXIST",
}


def _merchant(text: str) -> tuple[str, str]:
    mch_id, separator, api_key = text.partition(":")
    if not separator or not mch_id or len(api_key) != 32 or not api_key.isascii():
        raise argparse.ArgumentTypeError("expected MCH_ID:API_KEY with a 32-character ASCII key")
    return mch_id, api_key


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m django_wxpay_close.testing",
        description="A loopback WeChat Pay Global closeorder server for demos and manual testing.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--merchant", type=_merchant, action="append", metavar="MCH_ID:API_KEY",
        help=f"a merchant it accepts; repeatable (default: the demo merchant {MCH_ID}); with --notify the first "
             "one signs",
    )
    parser.add_argument(
        "--unknown-orders", choices=("not_exist", "open"), default="open",
        help="an order it was never told about: open (default) treats it as unpaid and closes it; "
             "not_exist answers ORDERNOTEXIST",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    notify = parser.add_argument_group(
        "sending a payment notification",
        "With --notify it serves nothing: it POSTs one signed payment result notification, as WeChat does, to a "
        "loopback URL (the shop's notify URL), prints the answer and exits 0 for SUCCESS, 1 otherwise.")
    notify.add_argument("--notify", metavar="URL", help="the notify URL, e.g. http://127.0.0.1:8000/wxpay/notify/")
    notify.add_argument("--out-trade-no", default=DEMO_OUT_TRADE_NO, help="the paid order (default: %(default)s)")
    notify.add_argument("--total-fee", type=int, default=1, help="amount paid, in the minor unit (default: 1)")
    notify.add_argument("--fee-type", default="HKD", help="currency paid (default: %(default)s)")
    notify.add_argument("--sub-mch-id", default=SUB_MCH_ID, help="default: %(default)s")
    notify.add_argument("--appid", default=APPID, help="default: %(default)s")
    notify.add_argument("--sub-appid", help="sent only when given")
    notify.add_argument("--sign-type", choices=[t.value for t in SignType], default=SignType.HMAC_SHA256.value,
                        help="must be the merchant's configured one (default: %(default)s)")
    return parser


def _demo_curl(simulator: WeChatPaySimulator, mch_id: str, api_key: str) -> str:
    """A curl command whose body is exactly what CloseOrderClient would send for the demo order."""
    merchant = Merchant(APPID, mch_id, SUB_MCH_ID, api_key, sign_type=SignType.HMAC_SHA256)
    with CloseOrderClient(merchant, base_urls=[simulator.base_url]) as client:
        prepared = client.prepare(DEMO_OUT_TRADE_NO)
    return shlex.join([
        "curl", "-sS", "-X", "POST", "-H", "Content-Type: text/xml", "--data-binary", prepared.body.decode("utf-8"),
        simulator.base_url + CLOSEORDER_PATH,
    ])


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _send_notification(args: argparse.Namespace, merchants: dict[str, str]) -> int:
    """POST one signed notification from the first merchant to args.notify; 0 when the shop answered SUCCESS."""
    mch_id = next(iter(merchants))
    signer = WeChatPaySimulator(merchants)  # never started: it only signs and posts
    body = signer.notification_body(
        args.out_trade_no, total_fee=args.total_fee, fee_type=args.fee_type, mch_id=mch_id,
        sub_mch_id=args.sub_mch_id, appid=args.appid, sub_appid=args.sub_appid, sign_type=args.sign_type,
    )
    try:
        status, answer = signer.post_notification(args.notify, body)
    except ValueError as exc:  # not a loopback URL
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: nothing answered at {args.notify}: {exc}", file=sys.stderr)
        return 1
    print(f"Payment notification for {args.out_trade_no} (mch_id {mch_id}, total_fee {args.total_fee} "
          f"{args.fee_type}) sent to {args.notify}", flush=True)
    print(f"HTTP {status}: {answer.decode('utf-8', 'replace')}", flush=True)
    print("Send the same body again (WeChat repeats a notification until it is answered SUCCESS) with:")
    print(shlex.join(["curl", "-sS", "-X", "POST", "-H", "Content-Type: text/xml", "--data-binary",
                      body.decode("utf-8"), args.notify]), flush=True)
    try:
        return 0 if status == 200 and decode_xml(answer).get("return_code") == "SUCCESS" else 1
    except InvalidXMLBody:
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    merchants = dict(args.merchant or [(MCH_ID, API_KEY)])
    if args.notify:
        return _send_notification(args, merchants)
    simulator = WeChatPaySimulator(
        merchants, host=args.host, port=args.port, unknown_orders=args.unknown_orders, latency=args.latency
    )
    demo_mch_id, demo_key = next(iter(merchants.items()))
    simulator.add_order(DEMO_OUT_TRADE_NO, mch_id=demo_mch_id, sub_mch_id=SUB_MCH_ID)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops as cleanly as Ctrl-C
    with simulator:
        print(f"WeChat Pay simulator listening on {simulator.base_url}", flush=True)
        print(f"Merchants: {', '.join(merchants)}; unknown orders: {args.unknown_orders} "
              f"({_UNKNOWN_ORDERS_MEANING[args.unknown_orders]})", flush=True)
        print(
            f"Demo order {DEMO_OUT_TRADE_NO} (mch_id {demo_mch_id}, sub_mch_id {SUB_MCH_ID}) is unpaid. "
            "Close it (a second run answers ORDERCLOSED) with:",
            flush=True,
        )
        print(_demo_curl(simulator, demo_mch_id, demo_key), flush=True)
        print("Tell a shop's notify URL that an order was paid with: python -m django_wxpay_close.testing "
              "--notify http://127.0.0.1:8000/wxpay/notify/ --out-trade-no ORDER --total-fee AMOUNT --fee-type HKD",
              flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("Stopping.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
