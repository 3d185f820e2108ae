"""Transfer ids say nothing of other clients: they are random (sql/0011_transfer_ids.sql), not drawn from one
sequence for the whole platform, and a random id that meets one the client already has is drawn again. Since
sql/0013_transfer_id_locality.sql the top 16 bits are the second of creation modulo 2^16, so that what one second
makes sits together in the indexes."""

from __future__ import annotations

from datetime import datetime

import ledgertest as lt


def test_ids_do_not_count_other_clients_transfers(api_a, api_b):
    """With one sequence for everybody, A's next id minus its last was 1 + what every other client made meanwhile."""
    a_from, a_to = api_a.funded_account(1000), api_a.new_account()
    b_from, b_to = api_b.funded_account(1000), api_b.new_account()
    first = lt.assert_json(api_a.transfer(a_from, a_to, 1), 201)["id"]
    for _ in range(30):
        lt.assert_json(api_b.transfer(b_from, b_to, 1), 201)
    second = lt.assert_json(api_a.transfer(a_from, a_to, 1), 201)["id"]
    assert first.isdigit() and second.isdigit()
    assert not 0 < int(second) - int(first) <= 1000, (first, second)
    ids = [int(lt.assert_json(api_a.transfer(a_from, a_to, 1), 201)["id"]) for _ in range(10)]
    assert len(set(ids)) == 10 and ids != sorted(ids), ids   # sorted by chance: 1 in 10!
    assert max(ids) > 2**40, "62-bit random ids, not small counters"


def test_ids_of_one_second_share_their_top_bits_and_are_random_below(api_a):
    """A batch runs in one transaction: its ids carry that second (mod 2^16, as created_at says) above 46 random
    bits, in no particular order."""
    payer, payee = api_a.funded_account(1000), api_a.new_account()
    items = [{"from": payer, "to": payee, "amount": 1, "currency": "USD"} for _ in range(40)]
    results = lt.assert_json(api_a.post("/v1/transfers/batch", {"transfers": items}), 201)["results"]
    transfers = [r["transfer"] for r in results]
    second = int(datetime.fromisoformat(transfers[0]["created_at"].replace("Z", "+00:00")).timestamp())
    ids = [int(t["id"]) for t in transfers]
    assert {(i - 1) >> 46 for i in ids} == {second & 0xFFFF}, (ids, transfers[0]["created_at"])
    low = [(i - 1) & (2**46 - 1) for i in ids]
    assert len(set(low)) == 40 and low != sorted(low) and max(low) > 2**40, low   # sorted by chance: 1 in 40!


def test_a_random_id_the_client_already_has_is_drawn_again(scratch_db, log_dir):
    """Forced collisions: ids come from a sequence that first repeats a taken id. The transaction that drew it rolls
    back whole and runs again with the next id: 201 and one transfer, never a 500."""
    lt.migrate(scratch_db)
    server = lt.LedgerServer(scratch_db, [], log_dir=log_dir)
    try:
        server.wait_healthy()
        api = lt.Api(server.base, lt.create_token(scratch_db, "ids"), "ids")
        account = api.new_account()
        lt.psql(scratch_db, "CREATE SEQUENCE public.forced_ids START 7; "
                            "ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT 7")
        assert lt.assert_json(api.credit(account, 10), 201)["id"] == "7"
        lt.psql(scratch_db, "ALTER TABLE ledger.transfers ALTER COLUMN id SET DEFAULT nextval('public.forced_ids')")
        key = lt.uid("k-")
        made = lt.assert_json(api.credit(account, 20, key=key), 201)
        assert made["id"] == "8", made   # 7 collided, the run again drew 8
        assert lt.psql(scratch_db, "SELECT count(*) FROM ledger.transfers") == "2"
        assert api.balance(account) == 30
        assert lt.verify(scratch_db).returncode == 0
    finally:
        server.stop()
