"""HashTable used from several Python threads at once: no crash, and a query never misses a key that was in
the table before it started (inserts that grow and rehash the table run at the same time). Runs in a fresh
process, so a crash is a test failure rather than a dead pytest."""
import subprocess
import sys
import textwrap


def test_concurrent_insert_and_query():
    code = textwrap.dedent("""
        import threading, torch
        from spconv.pytorch.hash import HashTable
        table = HashTable("cpu", torch.int64, torch.int64)
        base = torch.arange(0, 20000, dtype=torch.int64) * 7919
        table.insert(base, base * 3)
        errors, stop = [], threading.Event()

        def writer(seed):
            g = torch.Generator().manual_seed(seed)
            try:
                for it in range(150):
                    keys = torch.randint(-2 ** 62, 2 ** 62, (2000,), generator=g)  # grows and rehashes the table
                    table.insert(keys, keys)
                    table.insert_exist_keys(base[:100], base[:100] * 3)  # same values: readers see no change
                    if it % 10 == 0:
                        table.items()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        def reader():
            try:
                while not stop.is_set():
                    vals, empty = table.query(base)
                    if empty.any():
                        errors.append(f"query missed {int(empty.sum())} existing keys")
                        return
                    if not torch.equal(vals, base * 3):
                        errors.append("query returned wrong values")
                        return
                    len(table)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors[:5]
        vals, empty = table.query(base)
        assert not empty.any() and torch.equal(vals, base * 3)
        assert len(table) >= 20000 + 2 * 150 * 2000 - 100
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        f"exit code {proc.returncode}:\n{proc.stdout[-1000:]}\n{proc.stderr[-3000:]}"
