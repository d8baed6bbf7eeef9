"""Tests for chat.py: real server and client processes, talking real gRPC.

Each test starts `python chat.py server --port 0` in a temporary directory,
reads "listening on HOST:PORT" from its stdout, and then starts terminal
clients (`python chat.py client --no-gui`) that it drives through stdin and
reads through stdout (chat messages) and stderr (everything else). Where a
test needs to do what no well-behaved client does (send junk, never read,
send the same request twice), it talks to the server with a raw gRPC stub.

Tests wait for lines to appear, never for a fixed time. The classes follow
the path of alice's "hi": joining, sending and fan-out, who may join,
surviving crashes, and bad input.

Run: python -m unittest -v
"""

import asyncio
import fcntl
import json
import itertools
import os
import pty
import re
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
import unittest
from concurrent import futures

sys.dont_write_bytecode = True  # tests write only to temporary directories

import grpc  # noqa: E402

import chat  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = os.path.join(HERE, "chat.py")
BENCH = os.path.join(HERE, "bench.py")
WAIT = 20  # seconds: the most any expected line may take to appear

pb = chat.pb


class Process:
    """A `python chat.py ...` child. Threads collect its stdout and stderr
    lines so that a test can wait for one to appear."""

    def __init__(self, args, cwd, env=None, stdout=subprocess.PIPE,
                 preexec_fn=None, script=CHAT):
        self.args = args
        if args[0] == "bench.py":  # start("bench.py", ...) runs bench.py
            script, args = BENCH, args[1:]
        self.popen = subprocess.Popen(
            [sys.executable, script, *args], cwd=cwd, stdin=subprocess.PIPE,
            stdout=stdout, stderr=subprocess.PIPE, text=True,
            encoding="utf-8", bufsize=1, preexec_fn=preexec_fn,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
        self.lines = {"stdout": [], "stderr": []}
        if stdout != subprocess.PIPE:  # the test reads it itself
            del self.lines["stdout"]
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._collect, args=(name,),
                                         daemon=True)
                        for name in self.lines]
        for reader in self.readers:
            reader.start()

    def _collect(self, name):
        for line in getattr(self.popen, name):
            with self.changed:
                self.lines[name].append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines[name].append(None)  # end of stream
            self.changed.notify_all()

    def wait_for(self, pattern, stream="stderr", count=1):
        """Block until `count` lines of `stream` match the regex `pattern`;
        return the last of them. Fails the test after WAIT seconds."""
        regex = re.compile(pattern)

        def matches():
            return [line for line in self.lines[stream]
                    if line is not None and regex.search(line)]
        with self.changed:
            found = self.changed.wait_for(lambda: len(matches()) >= count,
                                          WAIT)
            if not found:
                raise AssertionError(
                    f"{self.args[0]}: no {count} line(s) matching {pattern!r} "
                    f"on {stream} within {WAIT} s; {stream} was:\n"
                    + "\n".join(line for line in self.lines[stream] if line))
            return matches()[count - 1]

    def output(self, stream="stdout"):
        """Lines of stream so far (all of them once the process has ended)."""
        with self.changed:
            return [line for line in self.lines[stream] if line is not None]

    def type(self, *lines):
        for line in lines:
            self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def finish(self):
        """Close stdin (end of input) and wait for the exit status."""
        self.popen.stdin.close()
        return self.wait()

    def wait(self):
        status = self.popen.wait(WAIT)
        for reader in self.readers:
            reader.join(WAIT)
        return status

    def stop(self):
        """Cleanup: end the process by its pid if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(WAIT)
        for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except (OSError, ValueError):
                pass


class ChatTestCase(unittest.TestCase):
    """Starts servers and clients in a temporary directory, ends them all."""

    plain = False  # True: start_server runs Part I alone (server --plain)
    script = CHAT  # or a cut of it (CutTest)

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "chat.db")

    def start(self, *args, env=None, **popen):
        process = Process(args, self.tmp.name, env, script=self.script,
                          **popen)
        self.addCleanup(process.stop)
        return process

    def start_server(self, *args, port=0, db=None, env=None):
        """Start a server; return it with .address ("HOST:PORT") and
        .port set."""
        if self.plain:
            args = ("--plain", *args)
        server = self.start("server", "--port", str(port),
                            "--db", db or self.db, *args, env=env)
        line = server.wait_for(r"^listening on ", stream="stdout")
        server.address = line.split()[-1]
        server.port = server.address.rsplit(":", 1)[1]
        return server

    def stop_server(self, server, how=signal.SIGTERM):
        """SIGTERM (a clean stop: exit status 0) or SIGKILL (a crash)."""
        server.popen.send_signal(how)
        status = server.wait()
        if how == signal.SIGTERM:
            self.assertEqual(status, 0)

    def restart_server(self, server, *args, how=signal.SIGTERM):
        """Stop server; start another on its port and database."""
        self.stop_server(server, how)
        return self.start_server(*args, port=server.port)

    def start_client(self, server, client_id, name, *flags,
                     expect_join=True, env=None):
        """A terminal client of server (or of anything with an .address,
        such as a Proxy)."""
        client = self.start("client", "--no-gui", "--server", server.address,
                            "--id", client_id, "--name", name, *flags,
                            env=env)
        if expect_join:
            client.wait_for(r"^connected to ")
        return client

    def proxy(self, server):
        """A Proxy in front of server, closed at cleanup."""
        proxy = Proxy(server.address)
        self.addCleanup(proxy.close)
        return proxy

    def stub(self, server):
        """A raw stub, for what well-behaved clients never do."""
        channel = grpc.insecure_channel(server.address)
        self.addCleanup(channel.close)
        return chat.services.ChatRoomStub(channel)

    def raw_join(self, stub, client_id, name="", timeout=WAIT):
        """Open a Join stream and read up to CaughtUp; return the call. It
        ends after timeout seconds (None: at cleanup)."""
        call = stub.Join(pb.JoinRequest(client_id=client_id, name=name),
                         timeout=timeout)
        self.addCleanup(call.cancel)
        for event in call:
            if event.HasField("caught_up"):
                return call
        self.fail("Join ended before CaughtUp")

    def certificate(self, name="localhost",
                    subject_alt_name="DNS:localhost,IP:127.0.0.1"):
        """A self-signed certificate and its key; returns their paths."""
        if not shutil.which("openssl"):
            self.skipTest("openssl not found")
        cert = os.path.join(self.tmp.name, f"{name}.crt")
        key = os.path.join(self.tmp.name, f"{name}.key")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out",
             cert, "-days", "1", "-subj", f"/CN={name}", "-addext",
             f"subjectAltName={subject_alt_name}"],
            check=True, capture_output=True, timeout=WAIT)
        return cert, key

    def assertShutOut(self, stub, client_id, code):
        """Every RPC from client_id is refused with code."""
        join = pb.JoinRequest(client_id=client_id)
        self.assertRefused(code, lambda timeout: list(
            stub.Join(join, timeout=timeout)))
        for call, request in (
                (stub.Send, pb.SendRequest(client_id=client_id,
                                           text="let me in")),
                (stub.MarkRead, pb.MarkReadRequest(client_id=client_id,
                                                   up_to_seq=1)),
                (stub.ListMembers, pb.ListMembersRequest(
                    client_id=client_id))):
            self.assertRefused(code, call, request)

    def assertRefused(self, code, call, *args):
        with self.assertRaises(grpc.RpcError) as caught:
            call(*args, timeout=WAIT)
        self.assertEqual(caught.exception.code(), code,
                         caught.exception.details())
        self.assertTrue(caught.exception.details())  # a sentence for people
        return caught.exception.details()


def texts(client):
    """'alice: hi' for each chat line the client printed (time removed)."""
    return [line.split("] ", 1)[1] for line in client.output()]


def send(stub, client_id, text):
    """Send text as client_id on a raw stub; return the SendReply."""
    return stub.Send(pb.SendRequest(client_id=client_id, text=text),
                     timeout=WAIT)


class JoinAndUnreadTest(ChatTestCase):
    """A member who comes online late gets what it has not read."""

    def test_late_joiners_get_unread_messages(self):
        # The assignment: alice sends; bob and chad come online later.
        server = self.start_server("--members", "1,2,3")
        alice = self.start_client(server, "1", "alice")
        alice.type("hi")
        self.assertEqual(alice.finish(), 0)  # exits once "hi" is stored
        for client_id, name in (("2", "bob"), ("3", "chad")):
            late = self.start_client(server, client_id, name)
            late.wait_for(r"1 unread message;")
            late.wait_for(r"^\[\d\d:\d\d:\d\d\] alice: hi$", stream="stdout")
            self.assertEqual(late.finish(), 0)
            self.assertEqual(texts(late), ["alice: hi"])

    def test_read_messages_are_not_replayed(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        alice.type("hi")
        bob = self.start_client(server, "2", "bob")
        bob.wait_for("alice: hi", stream="stdout")
        self.assertEqual(bob.finish(), 0)  # leaves after confirming "hi"
        alice.type("are you there?")
        self.assertEqual(alice.finish(), 0)
        bob = self.start_client(server, "2", "bob")
        bob.wait_for(r"1 unread message;")
        self.assertEqual(bob.finish(), 0)
        self.assertEqual(texts(bob), ["alice: are you there?"])

    def test_message_that_never_arrived_stays_unread(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1")
        send(stub, "1", "hi")
        # bob's client is told "1 unread", then dies before reading "hi".
        call = stub.Join(pb.JoinRequest(client_id="2"), timeout=WAIT)
        self.assertEqual(next(call).welcome.unread, 1)
        call.cancel()
        bob = self.start_client(server, "2", "bob")
        bob.wait_for(r"1 unread message;")
        bob.wait_for("alice|1: hi", stream="stdout")

    def test_plain_client_confirms_what_it_read(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob", "--plain")
        alice.type("hi", "how are you?")
        bob.wait_for("alice: how are you?", stream="stdout")
        self.assertEqual(bob.finish(), 0)  # once its last MarkRead is in
        alice.type("are you there?")
        self.assertEqual(alice.finish(), 0)
        bob = self.start_client(server, "2", "bob", "--plain")
        bob.wait_for(r"1 unread message;")
        self.assertEqual(bob.finish(), 0)
        self.assertEqual(texts(bob), ["alice: are you there?"])

    def test_plain_client_leaves_unread_what_never_arrived(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        proxy = self.proxy(server)
        bob = self.start_client(proxy, "2", "bob", "--plain")
        send(stub, "1", "hi")
        bob.wait_for("alice: hi", stream="stdout")
        # bob joins again after "hi": the server records it as read.
        proxy.cut()
        bob.wait_for(r"^reconnected to \S+ after \d+ s; 0 unread")
        proxy.freeze()  # from now on nothing reaches bob
        send(stub, "1", "are you there?")
        bob.popen.kill()
        bob.wait()
        bob = self.start_client(server, "2", "bob", "--plain")
        bob.wait_for(r"1 unread message;")
        bob.wait_for("alice: are you there?", stream="stdout")
        self.assertEqual(bob.finish(), 0)
        self.assertEqual(texts(bob), ["alice: are you there?"])

    def test_own_messages_after_the_read_position_come_back(self):
        """A new client process sees what it said after something it had
        not read, as its own, in order with the rest, and not counted as
        unread."""
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        stream = self.raw_join(stub, "1", "alice")  # confirms nothing
        send(stub, "1", "hi")  # alice had read everything: hi is read too
        bob = self.start_client(server, "2", "bob")
        bob.wait_for("alice: hi", stream="stdout")
        bob.type("hello")
        next(event for event in stream if event.messages)  # it is stored
        send(stub, "1", "one")  # after "hello", which alice did not read
        send(stub, "1", "two")
        bob.wait_for("alice: two", stream="stdout")
        bob.type("three")
        self.assertEqual(bob.finish(), 0)
        alice = self.start_client(server, "1", "alice")
        alice.wait_for(r"2 unread messages;")
        alice.wait_for("^-- end of unread messages --$")
        self.assertEqual(texts(alice), ["bob: hello", "alice: one",
                                        "alice: two", "bob: three"])
        bob = self.start_client(server, "2", "bob")
        alice.type("four")  # seqs still line up: nothing twice, no gap
        bob.wait_for("alice: four", stream="stdout")
        bob.type("five")
        alice.wait_for("bob: five", stream="stdout")
        self.assertEqual(texts(alice), ["bob: hello", "alice: one",
                                        "alice: two", "bob: three",
                                        "bob: five"])

    def test_own_messages_alone_are_not_replayed(self):
        """What a member sends after reading everything counts as read:
        100 lines piped in, and a new process shows none of them again."""
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        alice.type(*(f"line {n}" for n in range(100)))
        self.assertEqual(alice.finish(), 0)
        alice = self.start_client(server, "1", "alice")
        alice.wait_for(r"; 0 unread messages;")
        self.assertEqual(alice.finish(), 0)
        self.assertEqual(texts(alice), [])

    def test_own_messages_are_replayed_only_to_a_new_client(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "2", "bob")
        self.raw_join(stub, "1", "alice")
        send(stub, "2", "hello")  # unread by alice, so "hi" is too
        send(stub, "1", "hi")

        def replay(**request):
            call = stub.Join(pb.JoinRequest(client_id="1", **request),
                             timeout=WAIT)
            self.addCleanup(call.cancel)
            welcome = next(call).welcome
            messages = []
            for event in call:
                if event.HasField("caught_up"):
                    return welcome, messages
                messages.extend(event.messages)
        welcome, messages = replay()  # a new client process
        self.assertEqual(welcome.unread, 1)
        self.assertEqual([(m.sender_id, m.sender_name, m.text)
                          for m in messages],
                         [("2", "bob", "hello"), ("1", "alice", "hi")])
        self.assertEqual([m.text for m in replay(resuming=True)[1]],
                         ["hello"])
        send(stub, "1", "again")
        self.assertEqual(replay(after_seq=1)[1], [])  # resuming, too
        # Having read "hello", alice has all she sent after it, too.
        welcome, messages = replay(history=5)
        self.assertEqual([(m.sender_id, m.text) for m in welcome.recent],
                         [("2", "hello"), ("1", "hi"), ("1", "again")])
        self.assertEqual(messages, [])

    def test_running_client_is_not_sent_its_own_messages_again(self):
        # alice has read nothing (after_seq 0) when the server restarts.
        server = self.start_server("--members", "1,2")
        bob = self.raw_join(self.stub(server), "2", "bob")
        alice = self.start_client(server, "1", "alice")
        alice.type("first")
        next(event for event in bob if event.messages)  # "first" is stored
        server = self.restart_server(server, "--members", "1,2")
        alice.wait_for("^reconnected to ")
        stub = self.stub(server)
        self.raw_join(stub, "2", "bob")
        send(stub, "2", "back")
        alice.wait_for("bob: back", stream="stdout")
        self.assertEqual(texts(alice), ["bob: back"])

    def test_member_without_a_name_keeps_the_one_it_used(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice").cancel()
        self.raw_join(stub, "1")  # no name this time
        send(stub, "1", "hi")
        bob = stub.Join(pb.JoinRequest(client_id="2"), timeout=WAIT)
        self.addCleanup(bob.cancel)
        welcome = next(bob).welcome
        self.assertEqual([(m.id, m.name, m.online) for m in welcome.members],
                         [("1", "alice", True), ("2", "2", True)])
        self.assertEqual(next(bob).messages[0].sender_name, "alice")


class SendAndFanOutTest(ChatTestCase):
    """One message, stored once, delivered to everyone else in one order."""

    def test_everyone_but_the_sender_gets_it(self):
        server = self.start_server("--members", "1,2,3")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        chad = self.start_client(server, "3", "chad")
        alice.type("hi")
        bob.wait_for("alice: hi", stream="stdout")
        chad.wait_for("alice: hi", stream="stdout")
        chad.type("done")  # stored after "hi", so alice sees it after "hi"
        alice.wait_for("chad: done", stream="stdout")
        self.assertEqual(texts(alice), ["chad: done"])
        for client in (alice, bob, chad):
            self.assertEqual(client.finish(), 0)

    def test_joins_and_leaves_are_announced(self):
        server = self.start_server("--members", "1,2,3")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        alice.wait_for(r"^\* bob joined$")
        self.assertEqual(bob.finish(), 0)
        alice.wait_for(r"^\* bob left$")
        # Told only what is news: chad's Welcome already lists alice.
        chad = self.start_client(server, "3", "chad")
        self.assertEqual(alice.finish(), 0)
        chad.wait_for(r"^\* alice left$")
        self.assertNotIn("* alice joined", chad.output("stderr"))

    def test_presence_tells_each_member_only_news(self):
        """Presence changes go out in batches (Part III). Whatever its
        Welcome shows, each member then hears only news, never of its own
        arrival, and ends up knowing who is online."""
        server = self.start_server()
        stub = self.stub(server)
        rosters, calls = {}, {}

        def join(name):
            calls[name] = stub.Join(pb.JoinRequest(client_id=name, name=name),
                                    timeout=WAIT)
            self.addCleanup(calls[name].cancel)
            for event in calls[name]:
                if event.HasField("welcome"):
                    rosters[name] = {m.id: m.online
                                     for m in event.welcome.members}
                if event.HasField("caught_up"):
                    return
        for name in ("zed", "alice", "bob", "x"):
            join(name)
        calls.pop("x").cancel()
        server.wait_for(r"x \(x\) left")
        join("chad")
        send(stub, "zed", "end")
        send(stub, "alice", "end")  # zed hears of no message of its own
        for name, call in calls.items():
            roster = rosters[name]
            self.assertEqual(roster.get(name), True, name)  # its own entry
            for event in call:
                for member in event.presence:
                    self.assertNotEqual(member.id, name)
                    self.assertNotEqual(roster.get(member.id), member.online,
                                        f"{name} was told old news")
                    roster[member.id] = member.online
                if event.messages:  # sent after every change above
                    break
            self.assertEqual(
                {member for member, online in roster.items() if online},
                {"zed", "alice", "bob", "chad"}, name)

    def test_concurrent_senders_give_one_order_with_nothing_lost(self):
        server = self.start_server("--members", "1,2,3,4")
        senders = {name: self.start_client(server, str(i), name)
                   for i, name in enumerate(["alice", "bob", "chad"], 1)}
        dave = self.start_client(server, "4", "dave")  # only listens
        for name, client in senders.items():
            client.type(*[f"{name} {n}" for n in range(30)])
        dave.wait_for(".", stream="stdout", count=90)
        order = texts(dave)
        self.assertEqual(len(set(order)), 90)  # nothing twice
        for name, client in senders.items():
            mine = [f"{name}: {name} {n}" for n in range(30)]
            self.assertEqual([t for t in order if t.startswith(name)], mine)
            client.wait_for(".", stream="stdout", count=60)
            self.assertEqual(texts(client),
                             [t for t in order if not t.startswith(name)])
        for client in [*senders.values(), dave]:
            self.assertEqual(client.finish(), 0)

    def test_members_joining_mid_stream_get_each_message_once(self):
        """Joins in the middle of a stream of messages, which the hub hands
        out in rounds: each member gets each message once and in order,
        from its replay or live, never both."""
        server = self.start_server("--rate", "0")
        stub = self.stub(server)
        self.raw_join(stub, "alice")
        total, joiners = 300, 20
        sent_some = threading.Semaphore(0)

        def send_all():
            for n in range(total):
                send(stub, "alice", f"m{n}")
                if n % (total // joiners) == 0:
                    sent_some.release()

        sender = threading.Thread(target=send_all)
        sender.start()
        calls = []
        for k in range(joiners):  # one more Join every 15 messages
            sent_some.acquire()
            calls.append(stub.Join(pb.JoinRequest(client_id=f"j{k}"),
                                   timeout=WAIT))
            self.addCleanup(calls[-1].cancel)
        sender.join()
        for call in calls:
            got = []
            for event in call:
                got.extend(message.text for message in event.messages)
                if len(got) >= total:
                    break
            self.assertEqual(got, [f"m{n}" for n in range(total)])


class WhoMayJoinTest(ChatTestCase):
    """The group is fixed; the room has a size; an id is online once."""

    def test_stranger_is_refused_and_gets_nothing(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        alice.type("hi")
        eve = self.start_client(server, "9", "eve", expect_join=False)
        self.assertEqual(eve.finish(), 1)
        self.assertEqual(eve.output(), [])
        self.assertRegex(eve.output("stderr")[-1], "not a member")
        self.assertShutOut(self.stub(server), "9",
                           grpc.StatusCode.PERMISSION_DENIED)

    def test_full_room_refuses_until_someone_leaves(self):
        server = self.start_server("--max-clients", "2")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        chad = self.start_client(server, "3", "chad", expect_join=False)
        self.assertEqual(chad.finish(), 1)
        self.assertRegex(chad.output("stderr")[-1], "room is full")
        self.assertEqual(bob.finish(), 0)
        alice.wait_for(r"^\* bob left$")
        chad = self.start_client(server, "3", "chad")
        self.assertEqual(chad.finish(), 0)

    def test_thousands_of_rapid_joins_beyond_capacity(self):
        server = self.start_server("--max-clients", "3")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        stub = self.stub(server)
        calls = [stub.Join(pb.JoinRequest(client_id=f"x{os.urandom(6).hex()}"),
                           timeout=WAIT)
                 for _ in range(2000)]
        codes = []
        for call in calls:  # none leaves before all are answered
            try:
                next(call)  # the one that fits gets its Welcome
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        for call in calls:
            call.cancel()
        self.assertEqual(codes.count(grpc.StatusCode.OK), 1)
        # The rest: "room full" from us, or (a few dozen, seen here) CANCELLED
        # from gRPC itself, which sheds calls that arrive faster than the
        # server takes them. Either way: refused, nobody else joined.
        self.assertEqual(codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
                         + codes.count(grpc.StatusCode.CANCELLED), 1999)
        alice.type("still here")
        bob.wait_for("alice: still here", stream="stdout")

    def test_same_id_again_takes_over_the_old_session(self):
        server = self.start_server("--members", "1,2")
        old = self.start_client(server, "1", "alice")
        new = self.start_client(server, "1", "alice")
        old.wait_for("joined again from another client")
        self.assertEqual(old.wait(), 1)
        bob = self.start_client(server, "2", "bob")
        bob.type("still there?")
        new.wait_for("bob: still there", stream="stdout")

    def test_who_lists_members_and_who_is_online(self):
        server = self.start_server("--members", "1,2,3")
        alice = self.start_client(server, "1", "alice")
        alice.type("/who")
        alice.wait_for(r"^members: alice \(1, online\), 2 \(2\), 3 \(3\)$")

    def test_members_is_the_only_gate(self):
        """With --members, exactly those ids get in, whoever used the same
        database before; the messages of the others stay in the history."""
        server = self.start_server()  # open room
        server.wait_for("open room: any id may join")
        stub = self.stub(server)
        self.raw_join(stub, "9", "eve")
        send(stub, "9", "hi")
        server = self.restart_server(server, "--members", "1,2,3")
        server.wait_for("only ids 1, 2, 3 may join")
        self.assertShutOut(self.stub(server), "9",
                           grpc.StatusCode.PERMISSION_DENIED)
        alice = self.start_client(server, "1", "alice")
        alice.wait_for("eve: hi", stream="stdout")
        listed = self.stub(server).ListMembers(
            pb.ListMembersRequest(client_id="1"), timeout=WAIT).members
        self.assertEqual([(m.id, m.name) for m in listed],
                         [("1", "alice"), ("2", "2"), ("3", "3")])
        self.assertEqual(alice.finish(), 0)
        server = self.restart_server(server, "--members", "1,2")
        self.assertShutOut(self.stub(server), "3",
                           grpc.StatusCode.PERMISSION_DENIED)


class CrashAndRestartTest(ChatTestCase):
    """An acknowledged message is never lost; clients ride out a restart."""

    def test_acknowledged_message_survives_kill_9(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        reply = send(stub, "1", "survive")
        server = self.restart_server(server, "--members", "1,2",
                                     how=signal.SIGKILL)  # after the ack
        bob = self.start_client(server, "2", "bob")
        bob.wait_for("alice: survive", stream="stdout")
        self.assertEqual(reply.seq, 1)

    def test_client_reconnects_and_resumes_after_a_restart(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        alice.type("before")
        bob.wait_for("alice: before", stream="stdout")
        self.stop_server(server, signal.SIGKILL)
        bob.wait_for("^connection lost")
        bob.type("typed while the server was down")
        self.start_server("--members", "1,2", port=server.port)
        bob.wait_for("^reconnected to ")
        alice.wait_for("^reconnected to ")
        alice.wait_for("bob: typed while the server was down",
                       stream="stdout")
        alice.type("after")
        bob.wait_for("alice: after", stream="stdout")
        self.assertEqual(texts(bob), ["alice: before", "alice: after"])

    def test_client_resumed_into_another_history_gets_all_of_it(self):
        """A seq means something only in its own history. Restarted on
        another database, the server has other messages under bob's seqs:
        he starts over from his read position there, is told so, and sees
        nothing twice, not even back in the first history."""
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        proxy = self.proxy(server)
        bob = self.start_client(proxy, "2", "bob")
        words = ["one", "two", "three", "four", "five", "six", "seven",
                 "eight", "nine"]
        for text in words[:5]:
            send(stub, "1", text)
        bob.wait_for("alice: five", stream="stdout")

        def restart(db, times):
            """Restart the server on db while bob cannot get in; alice
            joins it. (times: the how-manieth restart this is.)"""
            nonlocal server
            proxy.refuse()
            self.stop_server(server)
            bob.wait_for("^connection lost", count=times)
            server = self.start_server("--members", "1,2",
                                       port=server.port, db=db)
            stub = self.stub(server)
            self.raw_join(stub, "1", "alice")
            return stub
        stub = restart(os.path.join(self.tmp.name, "other.db"), 1)
        for text in words[5:8]:  # seqs 1 to 3 there: bob had up to 5
            send(stub, "1", text)
        proxy.resume()
        bob.wait_for(r"^reconnected to .*; 3 unread messages;")
        bob.wait_for(r"^\* the server's history is not the one this client "
                     r"had \(it was reset or replaced\)")
        send(stub, "1", "nine")
        bob.wait_for("alice: nine", stream="stdout")
        stub = restart(self.db, 2)  # back: one to five are not shown again
        proxy.resume()
        bob.wait_for(r"^\* the server's history", count=2)
        send(stub, "1", "ten")
        bob.wait_for("alice: ten", stream="stdout")
        self.assertEqual(texts(bob), [f"alice: {text}"
                                      for text in words + ["ten"]])

    def test_sigterm_stops_the_server_cleanly(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        self.stop_server(server)
        server.wait_for("stopped; .* closed")
        alice.wait_for("connection lost: the server is shutting down")

    def test_second_server_on_the_same_database_is_refused(self):
        self.start_server()
        second = self.start("server", "--port", "0", "--db", self.db)
        self.assertEqual(second.wait(), 1)
        second.wait_for("in use by another chat server")

    def test_unreachable_server_is_reported(self):
        probe, address = listener()
        probe.close()  # a port where nothing listens
        client = self.start("client", "--no-gui", "--id", "1",
                            "--server", address)
        self.assertEqual(client.finish(), 1)
        self.assertRegex(client.output("stderr")[-1],
                         "cannot reach the server")


class BadInputTest(ChatTestCase):
    """Bad input gets a clear status; the server keeps serving everyone."""

    def setUp(self):
        super().setUp()
        # --rate 0: no flood control, so that a test can send fast.
        self.server = self.start_server("--members", "1,2,3", "--rate", "0")
        self.alice = self.start_client(self.server, "1", "alice")
        self.bob = self.start_client(self.server, "2", "bob")

    def assertStillChatting(self, text):
        self.alice.type(text)
        self.bob.wait_for(f"alice: {text}$", stream="stdout")

    def test_bad_messages_get_invalid_argument(self):
        stub = self.stub(self.server)
        bad = {"": "empty", " \n\t ": "empty", "x" * 4001: "limit is 4,000",
               "x" * 200_000: "limit is 4,000",
               "clear\x1b[2J": "control characters"}
        for text, sentence in bad.items():
            details = self.assertRefused(
                grpc.StatusCode.INVALID_ARGUMENT, stub.Send,
                pb.SendRequest(client_id="1", text=text))
            self.assertIn(sentence, details)
        self.assertRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Send,
                           pb.SendRequest(client_id="1", text="x" * 1_000_000))
        self.assertRefused(grpc.StatusCode.INVALID_ARGUMENT, stub.Send,
                           pb.SendRequest(client_id="1", text="ok",
                                          message_id="m" * 65))
        self.assertRefused(grpc.StatusCode.FAILED_PRECONDITION, stub.Send,
                           pb.SendRequest(client_id="3", text="not joined"))
        self.assertStillChatting("still fine")

    def test_bad_ids_and_names_get_invalid_argument(self):
        stub = self.stub(self.server)
        for request in (pb.JoinRequest(client_id=""),
                        pb.JoinRequest(client_id="x" * 33),
                        pb.JoinRequest(client_id="a b"),
                        pb.JoinRequest(client_id="1", name="n" * 33),
                        pb.JoinRequest(client_id="1", name="bell\a")):
            call = stub.Join(request)
            self.assertRefused(grpc.StatusCode.INVALID_ARGUMENT,
                               lambda timeout: list(call))
        self.assertStillChatting("ids checked")

    def test_empty_line_from_the_terminal_is_refused_not_sent(self):
        self.alice.type("", "after the empty one")
        self.alice.wait_for("not sent: a message needs some text")
        self.bob.wait_for("alice: after the empty one", stream="stdout")
        self.assertEqual(texts(self.bob), ["alice: after the empty one"])

    def test_junk_bytes_at_the_port(self):
        host, port = self.server.address.rsplit(":", 1)
        for junk in (b"GET / HTTP/1.1\r\n\r\n", os.urandom(4096),
                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(junk)
        self.assertStillChatting("after junk")

    def test_client_that_never_reads_is_disconnected(self):
        # carl (id 3) joins on a connection of his own and then never reads.
        # Everything sent to him piles up: first in gRPC's buffers (a few
        # MB), then in his queue on the server, until the queue is full.
        channel = grpc.insecure_channel(
            self.server.address,
            options=[("grpc.use_local_subchannel_pool", 1)])
        self.addCleanup(channel.close)
        carl = chat.services.ChatRoomStub(channel).Join(
            pb.JoinRequest(client_id="3", name="carl"))
        self.addCleanup(carl.cancel)
        self.alice.wait_for(r"^\* carl joined$")
        stub = self.stub(self.server)
        # Takes alice's place, to send, for as long as the sends may take
        # on a loaded machine (WAIT seconds would end it before).
        self.raw_join(stub, "1", "alice", timeout=None)
        text = "x" * (chat.MAX_TEXT_CHARS - 10)
        count = 0
        while not any("carl (3) fell" in line
                      for line in self.server.output("stderr")):
            count += 1
            send(stub, "1", f"{count} {text}")
            self.assertLess(count, 20_000, "carl was never disconnected")
        self.bob.wait_for(r"^\* carl left$")
        self.bob.wait_for("alice: ", stream="stdout", count=count)
        numbers = [int(t.split()[1]) for t in texts(self.bob)]
        self.assertEqual(numbers, list(range(1, count + 1)))
        # carl still does not read. As many messages again must not make
        # the server grow by as much as they hold (count x 4 KB, ~8 MB).
        before = rss_kb(self.server.popen.pid)
        for n in range(count + 1, 2 * count + 1):
            send(stub, "1", f"{n} {text}")
        self.bob.wait_for("alice: ", stream="stdout", count=2 * count)
        growth = rss_kb(self.server.popen.pid) - before
        print(f"\nslow consumer: server RSS {before} kB after the kick, "
              f"+{growth} kB after {count} more messages", file=sys.stderr)
        self.assertLess(growth, count * 4 // 2)

    def test_half_open_http2_preface_held_open(self):
        host, port = self.server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # then silence
            self.assertStillChatting("while a connection hangs half open")

    def test_invalid_utf8_in_a_string_field(self):
        channel = grpc.insecure_channel(self.server.address)
        self.addCleanup(channel.close)
        send = channel.unary_unary("/chat.ChatRoom/Send")  # bytes in, out
        # field 1 (client_id) = "1"; field 2 (text) = bytes 0xFF 0xFE
        details = self.assertRefused(grpc.StatusCode.INVALID_ARGUMENT, send,
                                     b"\x0a\x011\x12\x02\xff\xfe")
        self.assertIn("not a valid SendRequest", details)
        self.assertStillChatting("after bad UTF-8")

    def test_five_megabyte_request_is_cut_off_by_grpc(self):
        stub = self.stub(self.server)
        self.assertRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Send,
                           pb.SendRequest(client_id="1",
                                          text="x" * 5_000_000))
        self.assertStillChatting("after 5 MB")

    def test_client_killed_mid_stream(self):
        self.bob.popen.send_signal(signal.SIGKILL)
        self.alice.wait_for(r"^\* bob left$")
        bob = self.start_client(self.server, "2", "bob")
        self.alice.type("welcome back")
        bob.wait_for("alice: welcome back", stream="stdout")


class Proxy:
    """A TCP relay between clients and the server, to break the network on
    purpose: cut() drops every connection, refuse() turns new ones away
    until resume(), and freeze() keeps connections open but lets no byte
    through, like a peer whose network vanished without a FIN."""

    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener, self.address = listener()
        self.sockets = []
        self.refusing = self.frozen = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink),
                                 daemon=True).start()

    def _pump(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if not self.frozen:
                    sink.sendall(data)
            except OSError:
                break
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def refuse(self):
        self.refusing = True

    def resume(self):
        self.refusing = False

    def freeze(self):
        self.frozen = True

    def close(self):
        self.listener.close()
        self.cut()


def listener():
    """A socket listening on a free port of 127.0.0.1, and its "HOST:PORT".
    Closed at once, it leaves a port where nothing listens."""
    sock = socket.create_server(("127.0.0.1", 0))
    return sock, "127.0.0.1:%d" % sock.getsockname()[1]


def rss_kb(pid):
    """Resident memory of a process in kB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


class FaultTest(ChatTestCase):
    """Each promise, with the fault injected for real."""

    def test_dropped_connection_resumes_with_no_gap_and_no_repeat(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        proxy = self.proxy(server)
        bob = self.start_client(proxy, "2", "bob")
        send(stub, "1", "one")
        bob.wait_for("alice: one", stream="stdout")
        proxy.refuse()
        proxy.cut()  # the network drops; bob cannot get back in for now
        bob.wait_for("^connection lost")
        send(stub, "1", "two")    # while bob is away
        send(stub, "1", "three")
        proxy.resume()
        bob.wait_for("^reconnected to ")
        send(stub, "1", "four")
        bob.wait_for("alice: four", stream="stdout")
        self.assertEqual(texts(bob), ["alice: one", "alice: two",
                                      "alice: three", "alice: four"])

    def test_vanished_client_is_noticed_by_keepalive(self):
        server = self.start_server("--members", "1,2", "--keepalive", "1")
        alice = self.start_client(server, "1", "alice")
        proxy = self.proxy(server)
        self.start_client(proxy, "2", "bob")
        alice.wait_for(r"^\* bob joined$")
        proxy.freeze()  # bob's packets stop; no FIN, no RST
        alice.wait_for(r"^\* bob left$")
        server.wait_for("bob \\(2\\) left")

    def test_retried_send_is_stored_once(self):
        server = self.start_server("--members", "1,2")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        request = pb.SendRequest(client_id="1", text="only once",
                                 message_id="3f2a9c")
        first = stub.Send(request, timeout=WAIT)
        again = stub.Send(request, timeout=WAIT)  # as after a timeout
        self.assertEqual(first.seq, again.seq)
        send(stub, "1", "next")
        bob.wait_for("alice: next", stream="stdout")
        self.assertEqual(texts(bob), ["alice: only once", "alice: next"])

    def test_sigterm_during_a_burst_loses_nothing_acknowledged(self):
        server = self.start_server("--members", "1,2", "--rate", "0")
        stub = self.stub(server)
        self.raw_join(stub, "1", "alice")
        acknowledged = []
        for n in range(100_000):
            if n == 50:
                server.popen.send_signal(signal.SIGTERM)
            try:
                send(stub, "1", f"burst {n}")
            except grpc.RpcError:
                break  # the server is gone
            acknowledged.append(f"alice: burst {n}")
        self.assertEqual(server.wait(), 0)
        self.assertGreaterEqual(len(acknowledged), 50)
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        bob.wait_for("-- end of unread messages --")
        self.assertEqual(bob.finish(), 0)
        # Every acknowledged message, in order. The Send that failed may
        # or may not have been stored before the server went: at most one
        # more, the next in line (a client would retry it, same message_id).
        stored = texts(bob)
        self.assertEqual(stored[:len(acknowledged)], acknowledged)
        self.assertIn(stored[len(acknowledged):],
                      ([], [f"alice: burst {len(acknowledged)}"]))

    def test_flooding_member_is_slowed_down_and_loses_nothing(self):
        server = self.start_server("--members", "1,2,3", "--rate", "20")
        stub = self.stub(server)
        self.raw_join(stub, "3", "carl")
        refused = 0
        for n in range(60):  # far faster than 20 a second
            try:
                send(stub, "3", f"flood {n}")
            except grpc.RpcError as error:
                self.assertEqual(error.code(),
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assertIn("sending too fast", error.details())
                refused += 1
        self.assertGreater(refused, 0)
        # Our own client, piped 100 lines at once, waits and retries: every
        # line arrives, in order, once; and others are not held up.
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        alice.type(*[f"line {n}" for n in range(100)])
        bob.type("meanwhile")
        alice.wait_for("bob: meanwhile", stream="stdout")
        bob.wait_for("alice: line 99", stream="stdout")
        self.assertEqual(texts(bob)[-100:],
                         [f"alice: line {n}" for n in range(100)])
        self.assertEqual(alice.finish(), 0)

    def test_tls_and_a_plaintext_client_is_told(self):
        cert, key = self.certificate()
        server = self.start_server("--members", "1,2", "--tls-cert", cert,
                                   "--tls-key", key)
        alice = self.start("client", "--no-gui", "--id", "1", "--server",
                           server.address, "--tls-ca", cert)
        bob = self.start("client", "--no-gui", "--id", "2", "--name", "bob",
                         "--server", server.address, "--tls-ca", cert)
        bob.wait_for("^connected to ")
        alice.wait_for("^connected to ")
        alice.type("over TLS")
        bob.wait_for("1: over TLS", stream="stdout")
        # Each mistake gets its own sentence, and only these the TLS hint:
        # TLS on one side only, either way round; a certificate that does
        # not name the address used; a --tls-ca that does not vouch for it.
        plain_server = self.start_server(db=":memory:")
        other_cert, other_key = self.certificate("chat.example",
                                                 "DNS:chat.example")
        other = self.start_server("--tls-cert", other_cert, "--tls-key",
                                  other_key, db=":memory:")
        told = {
            (server.address,): r"at 127\.0\.0\.1:\d+ hung up at once: if it "
            "uses TLS, give its certificate with --tls-ca",
            (plain_server.address, "--tls-ca", cert): "does not use TLS: "
            "leave out --tls-ca",
            (other.address, "--tls-ca", other_cert): "certificate does not "
            r"name 127\.0\.0\.1 \(it names chat\.example\)",
            (server.address, "--tls-ca", other_cert): "certificate does not "
            "check out against .*chat.example.crt",
        }
        clients = {self.start("client", "--no-gui", "--id", "2", "--server",
                              *args): sentence
                   for args, sentence in told.items()}
        for client, sentence in clients.items():
            self.assertEqual(client.finish(), 1)
            self.assertRegex(client.output("stderr")[-1],
                             "^chat: .*" + sentence)

    def test_room_password(self):
        # Any text: not ASCII, so it travels as bytes (a "-bin" key).
        env = {"CHAT_PASSWORD": "crème brûlée"}
        server = self.start_server("--members", "1,2", env=env)
        for given in ({}, {"CHAT_PASSWORD": "swordfish"},
                      {"CHAT_PASSWORD": "creme brulee"}):
            refused = self.start("client", "--no-gui", "--id", "1",
                                 "--server", server.address, env=given)
            self.assertEqual(refused.finish(), 1)
            self.assertRegex(refused.output("stderr")[-1],
                             "UNAUTHENTICATED|password")
        stub = self.stub(server)
        self.assertShutOut(stub, "1", grpc.StatusCode.UNAUTHENTICATED)
        alice = self.start_client(server, "1", "alice", env=env)
        bob = self.start_client(server, "2", "bob", env=env)
        alice.type("with the password")
        bob.wait_for("alice: with the password", stream="stdout")
        self.stop_server(server)
        log = "\n".join(server.output("stderr"))
        self.assertIn("UNAUTHENTICATED", log)
        self.assertNotIn("crème brûlée", log)
        self.assertNotIn("swordfish", log)


def room_certificates(test):
    """Run README's recipe for client certificates, as written, in test's
    folder: room-ca, server and member1 to member3, each .crt and .key."""
    if not shutil.which("openssl") or not shutil.which("bash"):
        test.skipTest("openssl or bash not found")
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        recipe = re.search(r"```sh\n(# The room's CA.*?)```", f.read(),
                           re.S).group(1)
    subprocess.run(["bash", "-e", "-c", recipe], cwd=test.tmp.name,
                   check=True, capture_output=True, timeout=WAIT)


class ClientCertificateTest(ChatTestCase):
    """With --tls-client-ca, a member proves who it is with a certificate
    (mutual TLS), made with README's recipe, and may act only as itself."""

    def setUp(self):
        super().setUp()
        room_certificates(self)
        self.ca = self.path("room-ca.crt")
        self.server = self.start_server(
            "--members", "1,2", "--tls-cert", self.path("server.crt"),
            "--tls-key", self.path("server.key"), "--tls-client-ca", self.ca)

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    def openssl(self, script):
        subprocess.run(["bash", "-e", "-c", script], cwd=self.tmp.name,
                       check=True, capture_output=True, timeout=WAIT)

    def member(self, number, *flags, cert=None, key=None):
        """A terminal client with member{number}'s certificate (or cert and
        key), its id taken from it unless flags give --id."""
        return self.start(
            "client", "--no-gui", "--server", self.server.address,
            "--tls-ca", self.ca, "--tls-cert", cert or self.path(
                f"member{number}.crt"), "--tls-key", key or self.path(
                    f"member{number}.key"), *flags)

    def test_the_assignment_with_certificates(self):
        # alice sends "hi"; bob comes later and gets it; stranger 9, with
        # a certificate from the same CA, is refused.
        alice = self.member(1, "--name", "alice")
        alice.wait_for(r"^connected to .* as alice \(id 1\)")
        alice.type("hi")
        self.assertEqual(alice.finish(), 0)
        bob = self.member(2, "--name", "bob")
        bob.wait_for("alice: hi$", stream="stdout")
        self.assertEqual(bob.finish(), 0)
        self.openssl(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
            "-keyout member9.key -out member9.csr -subj /CN=9\n"
            "openssl x509 -req -in member9.csr -CA room-ca.crt -CAkey "
            "room-ca.key -CAcreateserial -days 1 -out member9.crt")
        stranger = self.member(9)
        self.assertEqual(stranger.finish(), 1)
        self.assertRegex(stranger.output("stderr")[-1],
                         "^chat: .*id 9 is not a member of this group")
        self.assertEqual(stranger.output(), [])

    def test_a_certificate_acts_only_for_its_member(self):
        bob = self.member(2, "--name", "bob")
        bob.wait_for("^connected to ")
        bob.type("for alice")
        self.assertEqual(bob.finish(), 0)
        pem = {name: chat.read_pem("a file", self.path(name))
               for name in ("room-ca.crt", "member2.key", "member2.crt")}
        channel = grpc.secure_channel(
            self.server.address, grpc.ssl_channel_credentials(
                pem["room-ca.crt"], pem["member2.key"], pem["member2.crt"]))
        self.addCleanup(channel.close)
        stub = chat.services.ChatRoomStub(channel)
        self.assertShutOut(stub, "1", grpc.StatusCode.PERMISSION_DENIED)
        details = self.assertRefused(
            grpc.StatusCode.PERMISSION_DENIED, stub.MarkRead,
            pb.MarkReadRequest(client_id="1", up_to_seq=1))
        self.assertEqual(details, "your certificate is for member 2; you "
                         "asked to act as 1.")
        # alice's read position did not move: "for alice" is unread.
        alice = self.member(1)
        alice.wait_for(r"; 1 unread message;")
        alice.wait_for("bob: for alice$", stream="stdout")
        self.assertEqual(alice.finish(), 0)

    def test_certificate_mistakes_get_one_sentence(self):
        self.openssl(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 "
            "-nodes -keyout other-ca.key -out other-ca.crt -days 1 "
            "-subj '/CN=another CA'\n"
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
            "-keyout other.key -out other.csr -subj /CN=1\n"
            "openssl x509 -req -in other.csr -CA other-ca.crt -CAkey "
            "other-ca.key -CAcreateserial -days 1 -out other.crt\n"
            "openssl x509 -req -in member1.csr -CA room-ca.crt -CAkey "
            "room-ca.key -CAcreateserial -days -1 -out expired.crt")
        clients = {
            self.start("client", "--no-gui", "--server", self.server.address,
                       "--id", "1", "--tls-ca", self.ca):
            r"the server wants a client certificate: give yours with "
            r"--tls-cert and --tls-key\.$",
            self.member(1, "--id", "1", cert=self.path("other.crt"),
                        key=self.path("other.key")):
            r"the server does not accept --tls-cert \S*other\.crt: is it "
            r"signed by the CA that the server trusts",
            self.member(1, cert=self.path("expired.crt")):
            r"--tls-cert \S*expired\.crt has expired; ask for a new one\.$",
            self.member(1, key=self.path("member2.key")):
            r"--tls-key \S*member2\.key is not the private key of "
            r"--tls-cert \S*member1\.crt\.$",
            self.member(1, "--id", "2"):
            r"--tls-cert \S*member1\.crt is for member 1, not --id 2",
        }
        for client, sentence in clients.items():
            self.assertEqual(client.finish(), 1, sentence)
            stderr = client.output("stderr")
            self.assertRegex(stderr[-1], "^chat: " + sentence)
            self.assertNotIn("Traceback", "\n".join(stderr))


# The same promises, kept by Part I alone (`server --plain`).

class JoinAndUnreadPlainTest(JoinAndUnreadTest):
    plain = True


class SendAndFanOutPlainTest(SendAndFanOutTest):
    plain = True


class WhoMayJoinPlainTest(WhoMayJoinTest):
    plain = True


class CrashAndRestartPlainTest(CrashAndRestartTest):
    plain = True


class BadInputPlainTest(BadInputTest):
    plain = True


class FaultPlainTest(FaultTest):
    plain = True


class ClientCertificatePlainTest(ClientCertificateTest):
    plain = True


class TerminalClientTest(ChatTestCase):
    """The terminal client as a command line: commands, names, what it
    says while the server is away, and nothing unsent lost quietly."""

    def test_commands_run_here_and_are_never_sent(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        alice.type("/help")
        alice.wait_for(r"^  /who ")
        alice.type("/nick bob")
        alice.wait_for(r"^not sent: '/nick bob': /nick is not a command; "
                       r"/help lists them; start a line with // to send it "
                       r"as text\.$")
        alice.type("//nick is how IRC renames you", "x" * 4001)
        alice.wait_for(r"^not sent: 'x{20}\.\.\.': the message is 4,001 "
                       "characters long")
        alice.type("done")
        bob.wait_for("alice: done", stream="stdout")
        self.assertEqual(texts(bob), ["alice: /nick is how IRC renames you",
                                      "alice: done"])
        self.assertEqual(alice.finish(), 0)

    def test_status_while_the_server_is_away_and_back(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        alice.wait_for(r"^connected to 127\.0\.0\.1:\d+ as alice \(id 1\); "
                       r"0 unread messages; nobody else online$")
        bob = self.start_client(server, "2", "bob")
        bob.wait_for(r"^connected to \S+ as bob \(id 2\); 0 unread "
                     r"messages; online: alice$")
        self.stop_server(server)
        alice.wait_for(r"^connection lost: the server is shutting down; "
                       r"your client will reconnect\.$")
        alice.type("typed while away", "/quit")
        alice.wait_for(r"^waiting for the server to store 1 message "
                       r"\(Ctrl-C to quit without it\)$")
        self.start_server("--members", "1,2", port=server.port)
        alice.wait_for(r"^reconnected to 127\.0\.0\.1:\d+ after \d+ s; 0 "
                       "unread messages; ")
        bob.wait_for("alice: typed while away", stream="stdout")
        self.assertEqual(alice.wait(), 0)

    def test_ctrl_c_with_messages_unsent_says_so_and_exits_1(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        self.stop_server(server, signal.SIGKILL)
        alice.wait_for("^connection lost: the server or the network went "
                       "away")
        alice.type("one", "two", "/quit")
        alice.wait_for(r"^waiting for the server to store 2 messages "
                       r"\(Ctrl-C to quit without them\)$")
        alice.popen.send_signal(signal.SIGINT)
        self.assertEqual(alice.wait(), 1)
        self.assertEqual(alice.output("stderr")[-1],
                         "chat: 2 messages not sent")

    def test_without_a_name_the_server_names_us(self):
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        nameless = self.start("client", "--no-gui", "--id", "1", "--server",
                              server.address)
        # New to the server, so it names us by our id.
        nameless.wait_for(r"^connected to \S+ as 1 \(id 1\); ")
        bob.wait_for(r"^\* 1 joined$")
        alice = self.start_client(server, "1", "alice")  # takes it over
        bob.wait_for(r"^\* 1 is now known as alice$")
        self.assertEqual(nameless.wait(), 1)
        self.assertEqual(alice.finish(), 0)
        # Back without --name: the server remembers "alice".
        again = self.start("client", "--no-gui", "--id", "1", "--server",
                           server.address)
        again.wait_for(r"^connected to \S+ as alice \(id 1\); ")
        bob.wait_for(r"^\* alice joined$")
        self.assertEqual(again.finish(), 0)

    def test_each_connection_failure_gets_its_own_sentence(self):
        # A port that takes connections and never answers: the listener's
        # backlog accepts them, and nothing ever reads.
        silent, silent_address = listener()
        self.addCleanup(silent.close)
        told = {
            silent_address: r"no answer within 10 s\. Is the server "
            r"stopped or busy, or a firewall in the way\?",
            "nosuch.invalid:50051": "the name nosuch.invalid does not "
            "resolve to an address",
            web_server(self): r"is not a gRPC server: check the port\.",
            grpc_server(self): r"is a gRPC server, but not a chat server\.",
        }
        # All at once: the silent one takes 10 s.
        clients = {self.start("client", "--no-gui", "--id", "1", "--server",
                              address): sentence
                   for address, sentence in told.items()}
        for client, sentence in clients.items():
            self.assertEqual(client.finish(), 1)
            last = client.output("stderr")[-1]
            self.assertRegex(last, "^chat: .*" + sentence)
            self.assertNotIn("TLS", last)

    def test_closed_pipes_end_it_as_a_unix_filter_ends(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        # stdin closed (`<&-`): no input, so join and leave at once.
        closed = self.start("client", "--no-gui", "--server", server.address,
                            "--id", "2", preexec_fn=lambda: os.close(0))
        self.assertEqual(closed.wait(), 0)
        self.assertNotIn("Traceback", "\n".join(closed.output("stderr")))
        # stdout into `head -1`: once the reader is gone, leave.
        reader, writer = os.pipe()
        bob = self.start("client", "--no-gui", "--server", server.address,
                         "--id", "2", stdout=writer)
        os.close(writer)
        bob.wait_for(r"^connected to ")
        alice.type("one")
        first = b""
        while not first.endswith(b"\n"):  # head -1 reads up to the newline
            self.assertTrue(select.select([reader], [], [], WAIT)[0])
            first += os.read(reader, 1)
        self.assertRegex(first.decode(), r"alice: one\n$")
        os.close(reader)
        alice.type("two")
        self.assertEqual(bob.wait(), 0)
        self.assertNotIn("Traceback", "\n".join(bob.output("stderr")))
        self.assertEqual(alice.finish(), 0)

    def test_bytes_that_are_not_utf8_are_refused_as_such(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        alice.popen.stdin.buffer.write(b"caf\xe9\n")
        alice.popen.stdin.flush()
        alice.wait_for(r"^not sent: .*: the message is not valid UTF-8 text")
        self.assertEqual(alice.finish(), 0)

    def test_room_password_is_asked_for_on_a_terminal(self):
        server = self.start_server(env={"CHAT_PASSWORD": "open sesame"})
        terminal = Terminal(self, "client", "--no-gui", "--id", "1",
                            "--name", "alice", "--server", server.address)
        terminal.wait_for("this room needs a password: ")
        terminal.type("open sesame")
        terminal.wait_for(r"connected to \S+ as alice \(id 1\)")
        terminal.type("/quit")
        self.assertEqual(terminal.wait(), 0)
        self.assertNotIn("open sesame", terminal.output)  # getpass: no echo


def web_server(test):
    """A socket that answers every connection like an HTTP/1 web server;
    returns its address."""
    server, address = listener()
    test.addCleanup(server.close)

    def answer():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return  # closed
            with connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    threading.Thread(target=answer, daemon=True).start()
    return address


def grpc_server(test):
    """A gRPC server with no services at all; returns its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    test.addCleanup(server.stop, None)
    return f"127.0.0.1:{port}"


class Terminal:
    """A `python chat.py ...` child on a pseudo-terminal of its own, as if a
    person ran it: stdin is a tty, and getpass() can open /dev/tty."""

    def __init__(self, test, *args):
        self.test = test
        self.pty, tty = pty.openpty()
        test.addCleanup(os.close, self.pty)
        self.popen = subprocess.Popen(
            [sys.executable, CHAT, *args], cwd=test.tmp.name, stdin=tty,
            stdout=tty, stderr=tty, start_new_session=True,
            env={key: value for key, value in os.environ.items()
                 if key != "CHAT_PASSWORD"},
            # The new session's controlling terminal: the one on stdin.
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(tty)
        test.addCleanup(self.stop)
        self.readable = selectors.DefaultSelector()
        test.addCleanup(self.readable.close)
        self.readable.register(self.pty, selectors.EVENT_READ)
        self.output = ""

    def wait_for(self, pattern):
        """Read the terminal until pattern shows; fail after WAIT s."""
        while not re.search(pattern, self.output):
            if not self.readable.select(WAIT):
                self.test.fail(f"no {pattern!r} within {WAIT} s; the "
                               f"terminal showed:\n{self.output}")
            try:
                self.output += os.read(self.pty, 4096).decode()
            except OSError:  # the child has ended and closed the terminal
                self.test.fail(f"no {pattern!r}; the terminal showed:\n"
                               f"{self.output}")

    def type(self, line):
        os.write(self.pty, line.encode() + b"\n")

    def wait(self):
        return self.popen.wait(WAIT)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(WAIT)


class BenchTest(ChatTestCase):
    """`python bench.py` runs, and finds nothing lost (no timings)."""

    def test_quick_bench_is_correct(self):
        """Against Part I (server --plain) and Part III (the default)."""
        bench = self.start("bench.py", "--clients", "20", "--messages", "10",
                           "--senders", "2", "--plain", "--idle", "0",
                           "--json")
        self.assertEqual(bench.wait(), 0)
        runs = json.loads("\n".join(bench.output()))
        self.assertEqual([run["server"] for run in runs],
                         ["Part I", "Part III"])
        for run in runs:
            self.assertEqual(run["deliveries"], 10 * 19)
            self.assertEqual((run["lost"], run["duplicated"],
                              run["reordered"]), (0, 0, 0))

    def test_storm_brings_everyone_in_and_counts_failed_joins(self):
        """--storm: 50 Joins every 50 ms, not waiting for the last."""
        bench = self.start("bench.py", "--clients", "120", "--messages", "3",
                           "--storm", "--idle", "0", "--json")
        self.assertEqual(bench.wait(), 0)
        (run,) = json.loads("\n".join(bench.output()))
        self.assertEqual(run["deliveries"], 3 * 119)
        self.assertEqual((run["joins_failed"], run["joins_failed_by_code"]),
                         (0, {}))

    def test_bench_refused_or_unreachable_says_why_and_exits_1(self):
        server = self.start_server("--members", "1,2")
        bench = self.start("bench.py", "--server", server.address,
                           "--clients", "2", "--messages", "1")
        self.assertEqual(bench.wait(), 1)
        [line] = bench.output("stderr")
        self.assertRegex(line, r"^bench: the server refused member "
                         r"b[01]: .*member")
        probe, address = listener()
        probe.close()  # a port where nothing listens
        bench = self.start("bench.py", "--server", address)
        self.assertEqual(bench.wait(), 1)
        self.assertRegex("\n".join(bench.output("stderr")),
                         f"^bench: cannot reach the server at {address}")

    def bench_server(self, server, *flags):
        """bench.py --server server with a small load; its exit status must
        be 0. Returns the process, ended."""
        bench = self.start("bench.py", "--server", server.address,
                           "--clients", "3", *flags)
        self.assertEqual(bench.wait(), 0, "\n".join(bench.output("stderr")))
        return bench

    def test_bench_measures_only_its_own_messages_in_a_used_room(self):
        """A room that holds ordinary messages, and one that looks like an
        older bench's, and then a room with a whole earlier run in it (unread
        by the same member ids, and sent under the same message numbers)."""
        server = self.start_server()
        stub = self.stub(server)
        self.raw_join(stub, "alice")
        for text in ("hello", "bench 3 12.5", "bench"):
            send(stub, "alice", text)
        for _ in range(2):
            bench = self.bench_server(server, "--messages", "5", "--json")
            [run] = json.loads("\n".join(bench.output()))
            self.assertEqual(run["deliveries"], 5 * 2)
            self.assertEqual((run["lost"], run["duplicated"],
                              run["reordered"]), (0, 0, 0))
            self.assertGreaterEqual(run["others_messages"], 3)

    def test_bench_ignores_a_message_that_arrives_during_the_run(self):
        server = self.start_server()
        bench = self.start("bench.py", "--server", server.address,
                           "--clients", "3", "--messages", "20",
                           "--rate", "10")
        bench.wait_for(r"sent 1/20")
        stub = self.stub(server)
        self.raw_join(stub, "alice")
        for text in ("hello, bench", "bench 5 1.0", "bench 0a1b2c 5 1.0"):
            send(stub, "alice", text)
        self.assertEqual(bench.wait(), 0, "\n".join(bench.output("stderr")))
        table = "\n".join(bench.output())
        for row in ("lost", "duplicated", "reordered"):
            self.assertRegex(table, rf"(?m)^{row} +0$")
        self.assertRegex(table, r"(?m)^others' messages +9$")  # 3 each

    def test_a_failure_inside_a_member_ends_the_run_with_a_sentence(self):
        """Any exception in a member's task ends the run at once, as
        BenchFailed (one sentence, exit status 1), instead of a hang."""
        sys.path.insert(0, HERE)
        self.addCleanup(sys.path.remove, HERE)
        import bench as bench_py

        class Broken(bench_py.Bench):
            def _arrived(self, stub, index, event):
                raise ValueError("a bug")
        server = self.start_server()
        args = bench_py.build_parser().parse_args(
            ["--server", server.address, "--clients", "2", "--messages", "1"])
        bench = Broken(args.server, args.server, None, args, progress=False)
        with self.assertRaises(bench_py.BenchFailed) as caught:
            asyncio.run(asyncio.wait_for(bench.run(), WAIT))
        self.assertRegex(str(caught.exception),
                         r"^member b[01] failed: ValueError: a bug \(")
        self.assertNotIn("\n", str(caught.exception))

    def test_bench_stopped_by_a_signal_cleans_up_and_says_so(self):
        """SIGTERM or SIGINT (Ctrl-C) in the middle of a run: one line, exit
        status 128 + the signal's number, the server it started stopped
        and its temporary folder (made under TMPDIR) gone."""
        for signum, sentence in ((signal.SIGTERM, "bench: stopped by SIGTERM"),
                                 (signal.SIGINT, "bench: interrupted")):
            with self.subTest(signal=signum.name):
                tmpdir = os.path.join(self.tmp.name, signum.name)
                os.mkdir(tmpdir)
                bench = self.start("bench.py", "--clients", "10",
                                   "--messages", "100", "--rate", "10",
                                   env={"TMPDIR": tmpdir})
                line = bench.wait_for(r"^Part III: server started, pid \d+,")
                pid = int(re.search(r"pid (\d+)", line)[1])
                bench.wait_for(r"sent 1/100")
                self.assertTrue(os.listdir(tmpdir))  # its folder, running
                bench.popen.send_signal(signum)
                self.assertEqual(bench.wait(), 128 + signum)
                stderr = bench.output("stderr")
                self.assertEqual(stderr[-1], sentence)
                self.assertNotIn("Traceback", "\n".join(stderr))
                self.assertEqual(os.listdir(tmpdir), [])
                self.assertFalse(os.path.exists(f"/proc/{pid}"))
                for proc in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{proc}/cmdline", "rb") as cmdline:
                            self.assertNotIn(tmpdir.encode(), cmdline.read())
                    except (FileNotFoundError, NotADirectoryError,
                            ProcessLookupError, PermissionError):
                        pass  # not a process, or gone

    def test_server_without_port_is_refused_as_the_client_refuses_it(self):
        """--server localhost: exit status 2 and client --server's sentence,
        not "nothing listens on that port"."""
        sentences = []
        for command in (("bench.py",), ("client", "--no-gui", "--id", "1")):
            process = self.start(*command, "--server", "localhost")
            self.assertEqual(process.wait(), 2)
            stderr = "\n".join(process.output("stderr"))
            self.assertNotIn("listens", stderr)
            sentences.append(re.search(r"argument --server: (.*)",
                                       stderr).group(1))
        self.assertEqual(sentences[0], sentences[1])
        self.assertIn("give HOST:PORT", sentences[0])


def cut_before(banner, folder):
    """chat.py up to the line that starts with banner, with the file's
    closing `if __name__` lines and chat.proto, in folder; its path."""
    with open(CHAT, encoding="utf-8") as file:
        text = file.read()
    start = text.index("\n" + banner) + 1
    ending = text[text.index('\nif __name__ == "__main__":') + 1:]
    cut = os.path.join(folder, "chat.py")
    with open(cut, "w", encoding="utf-8") as file:
        file.write(text[:start] + ending)
    shutil.copy(os.path.join(HERE, "chat.proto"), folder)
    return cut


PART_II = "# Part II: the window ="
PART_III = "# Part III: for a thousand members ="
APPENDIX = "# Appendix: diagnoses and the demo ="


class CutTest(ChatTestCase):
    """Each part runs with none of the parts after it (issue: chat.py in
    layers): Part I alone keeps the CS 2510 promises."""

    def cut(self, banner):
        folder = os.path.join(self.tmp.name, "cut")
        os.mkdir(folder)
        self.script = cut_before(banner, folder)

    def test_part_one_alone_keeps_the_promises(self):
        self.cut(PART_II)
        server = self.start_server("--members", "1,2")
        server.wait_for("serving with ChatRoomServicer")
        alice = self.start_client(server, "1", "alice")
        alice.type("hi")
        alice.finish()
        # No window in Part I: the client says so, and uses the terminal.
        bob = self.start("client", "--id", "2", "--name", "bob", "--server",
                         server.address, env={"DISPLAY": ":0"})
        bob.wait_for(r"^chat: this chat\.py has no window .*; using the "
                     r"terminal client$")
        bob.wait_for("alice: hi$", stream="stdout")  # unread on join
        self.assertEqual(bob.finish(), 0)
        self.assertEqual(texts(alice), [])  # no echo
        stranger = self.start_client(server, "9", "eve", expect_join=False)
        self.assertEqual(stranger.finish(), 1)
        self.assertRegex(stranger.output("stderr")[-1], "not a member")
        self.assertEqual(stranger.output(), [])
        # A restart keeps what bob has not read yet.
        alice = self.start_client(server, "1", "alice")
        alice.type("while you were away")
        self.assertEqual(alice.finish(), 0)
        server = self.restart_server(server, "--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        bob.wait_for("alice: while you were away$", stream="stdout")
        self.assertEqual(bob.finish(), 0)

    def test_part_one_alone_has_no_later_parts_flags(self):
        self.cut(PART_II)
        for flag in ("--plain", "--geometry"):
            process = self.start("client", "--id", "1", flag)
            self.assertEqual(process.wait(), 2)
            self.assertRegex(process.output("stderr")[-1],
                             f"unrecognized arguments: {flag}")
        demo = self.start("demo")
        self.assertEqual(demo.wait(), 2)
        self.assertRegex(demo.output("stderr")[-1], "invalid choice: 'demo'")

    def test_part_one_alone_says_what_grpc_and_sqlite_say(self):
        """Without the Appendix's Diagnose, mistakes get the words of gRPC
        and SQLite: one line, status 1, no traceback."""
        self.cut(PART_II)
        probe, address = listener()
        port = address.rsplit(":", 1)[1]
        cases = [
            (("server", "--port", port),
             f'^chat: cannot listen on 127.0.0.1:{port}: gRPC says only '
             '"Failed to bind to address"'),
            (("server", "--port", "0", "--db",
              os.path.join(self.tmp.name, "no", "chat.db")),
             r"^chat: cannot open --db .*no/chat\.db \(unable to open "
             r"database file\)\.$"),
            (("client", "--no-gui", "--id", "1", "--tls-ca", "missing.pem"),
             r"^chat: cannot read --tls-ca missing\.pem \(No such file or "
             r"directory\)\.$"),
        ]
        for command, sentence in cases:
            process = self.start(*command)
            self.assertEqual(process.wait(), 1)
            self.assertEqual(len(process.output("stderr")), 1)
            self.assertRegex(process.output("stderr")[0], sentence)
        probe.close()  # now nothing listens there
        client = self.start("client", "--no-gui", "--id", "1", "--server",
                            address)
        self.assertEqual(client.wait(), 1)
        self.assertRegex(client.output("stderr")[-1],
                         f"^chat: cannot reach the server at {address}: "
                         "failed to connect to all addresses")
        self.assertNotIn("Traceback", "\n".join(client.output("stderr")))

    def test_parts_one_to_three_without_the_appendix(self):
        self.cut(APPENDIX)
        server = self.start_server("--members", "1,2")
        server.wait_for("serving with ThousandMemberServicer")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob", "--plain")
        alice.type("hi")
        bob.wait_for("alice: hi$", stream="stdout")
        self.assertEqual(alice.finish(), 0)
        self.assertEqual(bob.finish(), 0)


HOP = re.compile(r"^  (alice|server|bob|     ) +([A-Za-z_][\w.]*) +§(\d+)\b")


def map_hops():
    """The hops of the header's map, in order: (side, function, section)."""
    text = chat.__doc__
    text = text[text.index("The path of alice's"):
                text.index("The sections are in")]
    hops, side = [], None
    for line in text.splitlines():
        if match := HOP.match(line):
            side = match[1].strip() or side
            hops.append((side, match[2], int(match[3])))
    return hops, text


def is_subsequence(items, sequence):
    """Do items appear in sequence in this order (not necessarily next to
    each other)?"""
    remaining = iter(sequence)
    return all(item in remaining for item in items)


class MapTest(ChatTestCase):
    """The header's map tells the truth (issue: chat.py in layers, #6):
    every function it names exists in the section it gives, and with
    CHAT_TRACE=1 each process prints alice's "hi" hops in the map's order,
    on both servers, with bob online and offline."""

    def test_every_function_the_map_names_exists_in_its_section(self):
        hops, text = map_hops()
        self.assertGreater(len(hops), 15)
        with open(CHAT, encoding="utf-8") as file:
            source = file.read().splitlines()
        for _side, name, section in hops:
            owner, _, function = name.rpartition(".")
            where = getattr(chat, owner) if owner else chat
            self.assertIn(function, vars(where), name)  # defined there
            line = vars(where)[function].__code__.co_firstlineno
            headings = [int(match[1]) for text_line in source[:line]
                        if (match := re.match(r"# (\d+)\. ", text_line))]
            self.assertEqual(headings[-1], section, name)
        for owner, function in re.findall(r"\b([A-Z]\w+)\.(\w+)\b", text):
            self.assertTrue(hasattr(getattr(chat, owner), function),
                            f"{owner}.{function}")
        for function in ("format_message", "parsed_as"):
            self.assertIn(function, text)
            self.assertTrue(callable(getattr(chat, function)))

    def test_alices_hi_travels_as_the_map_says(self):
        hops, _text = map_hops()
        seen = set()
        trace = {"CHAT_TRACE": "1"}
        for plain, online in itertools.product((False, True), repeat=2):
            flags = ("--plain",) if plain else ()
            server = self.start_server(*flags, db=os.path.join(
                self.tmp.name, f"{plain}-{online}.db"), env=trace)
            alice = self.start_client(server, "1", "alice", *flags, env=trace)
            if online:
                bob = self.start_client(server, "2", "bob", *flags, env=trace)
            alice.type("hi")
            self.assertEqual(alice.finish(), 0)
            if not online:
                bob = self.start_client(server, "2", "bob", *flags, env=trace)
            bob.wait_for("alice: hi$", stream="stdout")
            self.assertEqual(bob.finish(), 0)
            server.wait_for(r"^trace: server Store.mark_read seq=1 ")
            for side, process in (("alice", alice), ("server", server),
                                  ("bob", bob)):
                traced = [line.split()[2] for line in process.output("stderr")
                          if re.match(r"trace: \w+ \S+ (seq=1|text='hi') ",
                                      line)]
                path = [name for hop_side, name, _ in hops if hop_side == side]
                self.assertTrue(traced, (plain, online, side))
                self.assertTrue(is_subsequence(traced, path),
                                f"--plain={plain}, bob online={online}, "
                                f"{side}: {traced} is not in the map's order "
                                f"{path}")
                seen.update((side, name) for name in traced)
                for line in process.output("stderr"):
                    if line.startswith("trace: server"):
                        self.assertRegex(line, r" thread=MainThread "
                                         r"\(event loop\)$")
            server.popen.terminate()
            self.assertEqual(server.wait(), 0)
        self.assertEqual(seen, {(side, name) for side, name, _ in hops},
                         "hops of the map that no run went through")


class XvfbTestCase(ChatTestCase):
    """Runs a virtual screen (Xvfb) for the window tests."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("Xvfb") or not shutil.which("xdotool"):
            reason = "Xvfb or xdotool not found (apt-get install xvfb xdotool)"
            print(f"skipping window tests: {reason}", file=sys.stderr)
            raise unittest.SkipTest(reason)
        if chat.tk is None:
            raise unittest.SkipTest("tkinter is not installed")
        # -displayfd: Xvfb picks a free display number and writes it to
        # this pipe once it accepts clients, so there is nothing to guess
        # and nothing to wait for by time.
        read_end, write_end = os.pipe()
        cls.xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write_end), "-screen", "0",
             "1300x600x24", "-nolisten", "tcp"], pass_fds=[write_end],
            stderr=subprocess.DEVNULL)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            number = pipe.readline().strip()
        cls.display = f":{number}"

    @classmethod
    def tearDownClass(cls):
        cls.xvfb.kill()
        cls.xvfb.wait()

    def xdotool(self, *args):
        return subprocess.run(
            ["xdotool", *args], check=True, capture_output=True, text=True,
            env={**os.environ, "DISPLAY": self.display}, timeout=WAIT).stdout

    def start_window(self, server, client_id, *args):
        return self.start("client", "--id", client_id, "--server",
                          server.address, *args,
                          env={"DISPLAY": self.display, "CHAT_TRACE": "1"})

    def type_into(self, title, *keys):
        """Give the keyboard to the window whose title matches, then type
        each of keys: text, or a key such as "Return" or "ctrl+q"."""
        window_id = self.xdotool("search", "--sync", "--name",
                                 title).split()[0]
        self.xdotool("windowfocus", "--sync", window_id)
        for key in keys:
            if key in ("Return", "shift+Return", "End", "ctrl+a", "ctrl+q"):
                self.xdotool("key", key)
            else:
                self.xdotool("type", "--delay", "5", key)


class WindowTest(XvfbTestCase):
    """The Tk client in a real window, driven by xdotool on Xvfb."""

    def test_window_and_terminal_talk(self):
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        alice = self.start_window(server, "1", "--name", "alice")
        alice.wait_for("^tk: status Connected as alice")
        self.type_into("alice - chat", "hello from the window", "Return")
        bob.wait_for("alice: hello from the window$", stream="stdout")
        # Once stored, alice's line shows the time the server gave it,
        # the time bob sees.
        stored = alice.wait_for("^tk: sent 1 ").split()[-1]
        self.assertEqual(bob.output()[0], f"[{stored}] alice: hello from "
                         "the window")
        self.type_into("alice - chat", "line one", "shift+Return",
                       "line two", "Return")
        bob.wait_for(r"alice: line one\\nline two$", stream="stdout")
        bob.type("hi alice")
        alice.wait_for("^tk: message bob: hi alice new$")
        bob.finish()
        alice.wait_for("^tk: notice bob left$")

    def test_the_window_takes_the_terminals_commands(self):
        """One command table (COMMANDS) for both UIs: /who's answer and
        /help show in the chat, an unknown command is refused and stays in
        the box, "//" sends a line that starts with /, and /quit leaves."""
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        alice = self.start_window(server, "1", "--name", "alice")
        alice.wait_for("^tk: status Connected as alice")
        self.type_into("alice - chat", "/who", "Return")
        alice.wait_for(r"^tk: notice members: alice \(1, online\), "
                       r"bob \(2, online\)$")
        self.type_into("alice - chat", "/help", "Return")
        alice.wait_for(r"^tk: notice   /quit +leaves")
        self.type_into("alice - chat", "/nick al", "Return")
        alice.wait_for(r"^tk: status Not sent: /nick is not a command; "
                       r"/help lists them")
        self.type_into("alice - chat", "ctrl+a", "//nick is IRC", "Return")
        bob.wait_for("alice: /nick is IRC$", stream="stdout")
        self.type_into("alice - chat", "/quit", "Return")
        self.assertEqual(alice.wait(), 0)
        bob.wait_for(r"^\* alice left$")
        self.assertEqual(texts(bob), ["alice: /nick is IRC"])

    def test_name_dialog_comes_first(self):
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        window = self.start_window(server, "1")
        window.wait_for("^tk: name dialog 1$")
        # The id is prefilled and selected, so typing replaces it.
        self.type_into("your name", "zoe", "Return")
        window.wait_for("^tk: status Connected as zoe")
        bob.wait_for(r"^\* zoe joined$")

    def test_name_dialog_offers_the_name_the_server_remembers(self):
        server = self.start_server("--members", "1,2")
        self.assertEqual(self.start_client(server, "1", "alice").finish(), 0)
        bob = self.start_client(server, "2", "bob")
        window = self.start_window(server, "1")
        window.wait_for("^tk: name dialog alice$")
        # Ctrl+A selects all, in the name field and in the message box.
        self.type_into("your name", "End", "2", "ctrl+a", "zoe", "Return")
        window.wait_for("^tk: status Connected as zoe")
        self.type_into("zoe - chat", "draft", "ctrl+a", "hi", "Return")
        bob.wait_for("zoe: hi$", stream="stdout")
        self.assertEqual(texts(bob), ["zoe: hi"])

    def test_unread_divider_below_the_history(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_client(server, "1", "alice")
        bob = self.start_client(server, "2", "bob")
        alice.type("already read")
        bob.wait_for("alice: already read", stream="stdout")
        bob.finish()
        alice.type("new one", "new two")
        alice.finish()
        window = self.start_window(server, "2", "--name", "bob")
        window.wait_for("^tk: message alice: already read read$")
        window.wait_for("^tk: divider 2$")
        window.wait_for("^tk: message alice: new two new$")
        window.wait_for("^tk: scrolled to divider$")
        trace = window.output("stderr")
        self.assertLess(trace.index("tk: message alice: already read read"),
                        trace.index("tk: divider 2"))
        self.assertLess(trace.index("tk: divider 2"),
                        trace.index("tk: message alice: new one new"))

    def test_text_typed_while_the_server_is_down_is_sent_once_back(self):
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        alice = self.start_window(server, "1", "--name", "alice")
        alice.wait_for("^tk: status Connected as alice")
        self.stop_server(server, signal.SIGKILL)
        alice.wait_for(r"^tk: status Reconnecting: .*\. Away for 1 s\.$")
        alice.wait_for("^tk: members ◌ alice [(]you[)], ◌ bob$")
        self.type_into("alice - chat", "typed while down", "Return")
        alice.wait_for("^tk: message alice: typed while down sending$")
        self.start_server("--members", "1,2", port=server.port)
        alice.wait_for("^tk: sent 1 ")
        alice.wait_for("^tk: status Connected as alice", count=2)
        bob.wait_for("alice: typed while down", stream="stdout")
        bob.type("welcome back")
        alice.wait_for("^tk: message bob: welcome back new$")
        self.assertEqual(texts(bob), ["alice: typed while down"])

    def test_password_dialog_comes_first_and_asks_again_if_wrong(self):
        server = self.start_server(env={"CHAT_PASSWORD": "crème brûlée"})
        alice = self.start_client(server, "1", "alice",
                                  env={"CHAT_PASSWORD": "crème brûlée"})
        self.assertEqual(alice.finish(), 0)
        window = self.start_window(server, "1")
        window.wait_for("^tk: password dialog$")
        self.type_into("^chat.py$", "creme brulee", "Return")
        window.wait_for("^tk: password dialog again$")
        self.type_into("^chat.py$", "crème brûlée", "Return")
        # Then the name the server remembers for id 1, as in an open room.
        window.wait_for("^tk: name dialog alice$")
        self.type_into("your name", "Return")
        window.wait_for("^tk: status Connected as alice")

    def test_clicking_send_leaves_the_keyboard_in_the_message_box(self):
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        window = self.start_window(server, "1", "--name", "alice",
                                   "--geometry", "400x300+0+0")
        window.wait_for("^tk: status Connected as alice")
        self.type_into("alice - chat", "clicked")
        window_id = self.xdotool("search", "--name", "alice - chat").split()[0]
        # The Send button, right of the message box in a 400x300 window.
        self.xdotool("mousemove", "--window", window_id, "347", "241",
                     "click", "1")
        bob.wait_for("alice: clicked$", stream="stdout")
        self.type_into("alice - chat", "typed after", "Return")
        bob.wait_for("alice: typed after$", stream="stdout")

    def test_ctrl_c_closes_the_window_at_once(self):
        server = self.start_server("--members", "1,2")
        window = self.start_window(server, "1", "--name", "alice")
        window.wait_for("^tk: status Connected as alice")
        window.popen.send_signal(signal.SIGINT)
        self.assertEqual(window.wait(), 0)
        self.assertNotIn("Traceback", "\n".join(window.output("stderr")))

    def test_closing_with_unsent_messages_asks_and_enter_keeps_them(self):
        server = self.start_server("--members", "1,2")
        alice = self.start_window(server, "1", "--name", "alice")
        alice.wait_for("^tk: status Connected as alice")
        self.stop_server(server, signal.SIGKILL)
        self.type_into("alice - chat", "one", "Return", "two", "Return")
        alice.wait_for("^tk: message alice: two sending$")
        self.type_into("alice - chat", "ctrl+q")
        alice.wait_for("^tk: close dialog 2 messages not sent yet. "
                       "Close anyway and lose them[?]$")
        self.type_into("^chat.py$", "Return")  # No is the default
        alice.wait_for("^tk: kept open$")
        self.type_into("alice - chat", "ctrl+q")
        alice.wait_for("^tk: close dialog", count=2)
        alice.popen.send_signal(signal.SIGINT)  # closes, dialog and all
        self.assertEqual(alice.wait(), 1)
        stderr = "\n".join(alice.output("stderr"))
        self.assertIn("chat: 2 messages not sent", stderr)
        self.assertNotIn("Traceback", stderr)

    def test_refused_join_shows_the_reason_and_exits_1(self):
        server = self.start_server("--members", "1,2")
        window = self.start_window(server, "9", "--name", "eve")
        window.wait_for("^tk: status The server refused to let you join: "
                        ".*not a member of this group")
        self.type_into("^chat.py$", "Return")  # the error dialog's OK
        self.assertEqual(window.wait(), 1)

    def test_window_with_a_client_certificate(self):
        room_certificates(self)
        path = lambda name: os.path.join(self.tmp.name, name)
        server = self.start_server(
            "--members", "1,2", "--tls-cert", path("server.crt"), "--tls-key",
            path("server.key"), "--tls-client-ca", path("room-ca.crt"))
        tls = lambda member: ("--tls-ca", path("room-ca.crt"), "--tls-cert",
                              path(f"member{member}.crt"), "--tls-key",
                              path(f"member{member}.key"))
        window = self.start("client", "--server", server.address, "--name",
                            "alice", *tls(1), env={"DISPLAY": self.display,
                                                   "CHAT_TRACE": "1"})
        window.wait_for("^tk: status Connected as alice")
        bob = self.start("client", "--no-gui", "--server", server.address,
                         "--name", "bob", *tls(2))
        bob.type("hi alice")
        self.assertEqual(bob.finish(), 0)
        window.wait_for("^tk: message bob: hi alice new$")
        window.popen.terminate()  # as Ctrl-C: closes at once
        self.assertEqual(window.wait(), 0)


class CutWindowTest(XvfbTestCase):
    """Parts I and II alone: a window joins and shows a message; and so
    does the plain window of section 10, without the polish after it."""

    def cut_and_talk(self, banner):
        folder = os.path.join(self.tmp.name, "cut")
        os.mkdir(folder)
        self.script = cut_before(banner, folder)
        server = self.start_server("--members", "1,2")
        bob = self.start_client(server, "2", "bob")
        alice = self.start_window(server, "1", "--name", "alice")
        alice.wait_for("^tk: status Connected as alice")
        bob.type("hi alice")
        alice.wait_for("^tk: message bob: hi alice new$")
        self.type_into("alice - chat", "hi bob", "Return")
        bob.wait_for("alice: hi bob$", stream="stdout")
        return alice

    def test_a_window_with_parts_one_and_two(self):
        self.cut_and_talk(PART_III)

    def test_the_plain_window_without_its_polish(self):
        alice = self.cut_and_talk("# The window's polish -")
        alice.wait_for(r"^tk: sent 2 ")  # bob's hi was 1
        self.type_into("alice - chat", "/quit", "Return")
        self.assertEqual(alice.wait(), 0)


class DemoTest(XvfbTestCase):
    """`python chat.py demo`: three windows; closing the last stops all."""

    def start_demo(self):
        """Start the demo; return it and the pids it names (the server and
        the windows), each killed at cleanup if still there."""
        demo = self.start("demo", env={"DISPLAY": self.display})
        demo.wait_for("^demo: close the three windows")
        pids = [int(line.rsplit(" ", 1)[1])
                for line in demo.output("stderr") if " pid " in line]
        self.addCleanup(kill_all, pids)
        return demo, pids

    def assertAllGone(self, pids):
        """Each has ended and been reaped."""
        for pid in pids:
            with self.assertRaises(ProcessLookupError):
                os.kill(pid, 0)

    def test_demo_opens_three_windows_and_stops_with_the_last(self):
        demo, pids = self.start_demo()
        # Found first: a search while another window closes can fail with
        # that window's BadWindow.
        found = [self.xdotool("search", "--sync", "--name",
                              f"{name} - chat").split()[0]
                 for name in ("alice", "bob", "chad")]
        for window_id in found:
            self.xdotool("windowfocus", "--sync", window_id)
            self.xdotool("key", "ctrl+q")
        self.assertEqual(demo.wait(), 0)
        self.assertAllGone(pids)

    def test_ctrl_c_stops_the_demo_and_every_window(self):
        demo, pids = self.start_demo()
        for name in ("alice", "bob", "chad"):
            self.xdotool("search", "--sync", "--name", f"{name} - chat")
        demo.popen.send_signal(signal.SIGINT)
        self.assertEqual(demo.wait(), 0)
        stderr = demo.output("stderr")
        self.assertEqual(stderr[-1], "demo: stopped")
        self.assertNotIn("Traceback", "\n".join(stderr))
        self.assertAllGone(pids)

    def test_demo_without_a_working_display_says_so(self):
        demo = self.start("demo", env={"DISPLAY": ":999"})  # nothing there
        self.assertEqual(demo.wait(), 1)
        self.assertEqual(demo.output("stderr"), [
            "chat: the demo needs windows, but cannot open a window "
            "(couldn't connect to display \":999\")"])


def kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WindowViewTest(XvfbTestCase):
    """The window's view logic, in this process, against a real server."""

    def setUp(self):
        super().setUp()
        self.server = self.start_server("--members", "1,2")
        self.root = chat.tk.Tk(screenName=self.display)
        self.addCleanup(self.root.destroy)
        args = chat.build_parser().parse_args(
            ["client", "--id", "1", "--server", self.server.address])
        args.tls = chat.client_tls(args)  # as run_client() does
        self.window = args.window_class(self.root, args)  # PolishedWindow
        self.window.join("alice")
        self.addCleanup(self.window.chat.close)
        # Run Tk's event loop until the window is online, after the Welcome
        # and the replay (they come in over the wake pipe), or WAIT seconds
        # pass.
        expired = []
        timer = self.root.after(WAIT * 1000, expired.append, True)
        while not (self.window.connection.startswith("Connected as")
                   or expired):
            self.root.tk.dooneevent()
        self.root.after_cancel(timer)
        self.assertTrue(self.window.joined, "no Welcome")
        self.root.update()

    def view_text(self):
        return self.window.view.get("1.0", "end-1c")

    def test_empty_or_oversized_message_is_refused_in_the_window(self):
        for text in ("   ", "x" * (chat.MAX_TEXT_CHARS + 1)):
            self.window.entry.insert("1.0", text)
            self.window.send_typed()
            self.assertIn("Not sent:", self.window.status.cget("text"))
            self.assertEqual(self.window.entry.get("1.0", "end-1c"), text)
            self.window.entry.delete("1.0", "end")
        self.assertEqual(self.view_text(), "")

    def test_view_follows_new_messages_unless_scrolled_up(self):
        def message(n):
            return pb.ChatMessage(seq=n, sender_id="2", sender_name="bob",
                                  text=f"message {n}")
        for n in range(1, 60):
            self.window._show_message(message(n))
        self.root.update()
        self.assertEqual(self.window.view.yview()[1], 1.0)  # at the bottom
        self.window.view.yview_moveto(0)  # the user scrolls up to read
        self.root.update()
        self.window._show_message(message(60))
        self.window._show_message(message(61))
        self.root.update()
        self.assertEqual(self.window.view.yview()[0], 0.0)  # left alone
        self.assertTrue(self.view_text().endswith("bob: message 61"))
        jump = self.window.jump  # a button says what waits below
        self.assertTrue(jump.winfo_ismapped())
        self.assertEqual(jump.cget("text"), "\u2193 2 new messages")
        jump.invoke()
        self.root.update()
        self.assertEqual(self.window.view.yview()[1], 1.0)
        self.assertFalse(jump.winfo_ismapped())

    def test_every_line_of_a_message_is_indented_after_the_first(self):
        self.window._show_message(pb.ChatMessage(
            seq=1, sender_id="2", sender_name="bob", text="one\ntwo\nthree"))
        self.root.update()
        left = [self.window.view.bbox(f"{line}.0")[0] for line in (1, 2, 3)]
        self.assertLess(left[0], left[1])
        self.assertEqual(left[1], left[2])

    def test_each_sender_has_a_colour_of_its_own_and_yours_is_blue(self):
        view = self.window.view
        for seq, (sender_id, name) in enumerate(
                [("2", "bob"), ("3", "chad"), ("2", "bob"), ("1", "alice")]):
            self.window._show_message(pb.ChatMessage(
                seq=seq + 1, sender_id=sender_id, sender_name=name, text="hi"))
        colours = []
        for line in range(1, 5):
            name_at = view.search(": ", f"{line}.0") + " -1c"
            colours.append([view.tag_cget(tag, "foreground")
                            for tag in view.tag_names(name_at)
                            if view.tag_cget(tag, "foreground")][-1])
        bob, chad, bob_again, alice = colours
        self.assertEqual(bob, bob_again)
        self.assertNotEqual(bob, chad)
        self.assertEqual(alice, self.window.COLORS["own"])
        self.assertNotIn(self.window.COLORS["own"], (bob, chad))

    def test_a_message_from_another_day_shows_its_date(self):
        message = pb.ChatMessage(seq=1, sender_id="2", sender_name="bob",
                                 text="hi")
        message.sent_at.FromSeconds(int(time.time()) - 3 * 86400)
        self.window._show_message(message)
        self.assertRegex(self.view_text(),
                         r"^\[\d{4}-\d\d-\d\d \d\d:\d\d\] bob: hi$")

    def test_a_long_refusal_wraps_in_the_status_bar(self):
        self.root.update()
        width, height = (self.root.winfo_width(),
                         self.window.status.winfo_height())
        window_height = self.root.winfo_height()
        sentence = "The server refused: " + "a long reason " * 30
        self.window._show_status(sentence, problem=True)
        self.root.update()
        self.assertEqual(self.window.status.cget("text"), sentence)
        self.assertEqual(self.root.winfo_width(), width)  # not wider...
        self.assertEqual(self.root.winfo_height(), window_height)  # nor taller
        self.assertGreater(self.window.status.winfo_height(), 2 * height)

    def test_status_counts_while_away_and_the_clock_stops_when_back(self):
        window = self.window
        window._show_state("reconnecting", "the server is shutting down.",
                           time.monotonic() - 15.5)
        self.assertEqual(window.status.cget("text"), "Reconnecting: the "
                         "server is shutting down. Away for 15 s.")
        self.assertEqual({line[0] for line in window.members.get(0, "end")},
                         {"◌"})  # nobody is known to be online
        self.assertTrue(self.root.tk.call("after", "info"))  # the clock
        window._show_state("online", "")
        self.assertIn("Connected as alice", window.status.cget("text"))
        self.assertFalse(self.root.tk.call("after", "info"))  # no timer


class StartUpMistakesTest(ChatTestCase):
    """Every ordinary mistake on the command line gets a sentence naming
    the flag and a non-zero exit status, never a traceback: status 2 with
    the command's usage for a wrong flag value (argparse's convention), 1
    for a file, port or address that will not do."""

    CORE_LOG_LINE = r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ "  # gRPC's own

    def assertAllRefused(self, status, cases):
        """Run `chat.py *args` for each (args, pattern), all at once. Each
        must exit with status, and its stderr end in a line matching pattern:
        for status 1, its only line."""
        started = [(self.start(*args), pattern) for args, pattern in cases]
        for process, pattern in started:
            with self.subTest(args=process.args):
                self.assertEqual(process.finish(), status)
                errors = process.output("stderr")
                self.assertNotIn("Traceback", "\n".join(errors))
                self.assertRegex(errors[-1], pattern)
                if status == 1:
                    self.assertEqual(len(errors), 1, errors)

    def test_wrong_flag_values_name_the_flag(self):
        url = "http://127.0.0.1:1"
        self.assertAllRefused(2, [
            (("server", "--port", "99999"), "argument --port: must be"),
            (("server", "--port", "-1"), "argument --port: must be"),
            (("bench.py", "baseline", "--port", "70000"),
             "argument --port: must be"),
            (("bench.py", "--messages", "0"),
             "argument --messages: must be 1 or more"),
            (("bench.py", "--rate", "nan"), "argument --rate: must be 0"),
            (("bench.py", "--clients", "2", "--senders", "3"),
             "^bench: --senders must be from 1 to --clients$"),
            (("server", "--rate", "-5"), "argument --rate: must be 0 or"),
            (("server", "--max-clients", "-1"), "argument --max-clients"),
            (("server", "--keepalive", "0"),
             "argument --keepalive: must be more than 0"),
            (("server", "--db", ""), "argument --db: give a file name"),
            (("server", "--tls-cert", "server.crt"),
             "--tls-cert and --tls-key go together"),
            (("client", "--id", "a b"), "argument --id: .* not valid"),
            (("client", "--id", "1", "--server", url),
             "argument --server: .*not a URL"),
            (("client", "--id", "1", "--server", "127.0.0.1"),
             "argument --server: give HOST:PORT"),
            (("client", "--id", "1", "--server", ""),
             "argument --server: give HOST:PORT"),
            (("client", "--id", "1", "--server", "127.0.0.1:99999"),
             "argument --server: .* is not a port number"),
            (("client", "--id", "1", "--geometry", "banana"),
             "argument --geometry: give WxH"),
            (("client", "--id", "2", "--bogus"),
             "^chat.py client: error: unrecognized arguments: --bogus"),
        ])

    def test_lower_case_log_level_and_an_id_given_twice(self):
        server = self.start_server("--log-level", "debug",
                                   "--members", "1,1,2")
        server.wait_for(r"^\S+ \S+ DEBUG ")
        args = chat.build_parser().parse_args(
            ["server", "--members", "1,1,2", "--log-level", "debug"])
        self.assertEqual((args.members, args.log_level),
                         (["1", "2"], "DEBUG"))

    def test_help_says_what_a_new_user_needs(self):
        for command in ("server", "client"):
            self.assertIn("CHAT_PASSWORD", help_of(command))
        self.assertRegex(help_of("client"),
                         r"--id ID +your member id: 1 to 32")
        self.assertIn("It stops when the last window closes", help_of("demo"))
        self.assertIn("stores nothing", help_of("baseline", script=BENCH))

    def test_database_mistakes(self):
        not_a_db = os.path.join(self.tmp.name, "notes.txt")
        with open(not_a_db, "w") as notes:
            notes.write("not a database\n")
        cases = [
            (os.path.join(self.tmp.name, "missing", "chat.db"),
             "^chat: --db .*: there is no folder"),
            (self.tmp.name, "^chat: --db .* is a folder"),
            (not_a_db, "^chat: --db .* is not an SQLite database"),
        ]
        if os.geteuid() != 0:  # root may write anywhere
            read_only = os.path.join(self.tmp.name, "read-only.db")
            open(read_only, "w").close()
            os.chmod(read_only, 0o444)
            locked = os.path.join(self.tmp.name, "locked")
            os.mkdir(locked, 0o555)
            self.addCleanup(os.chmod, locked, 0o755)
            cases += [(read_only, "^chat: --db .* is read-only"),
                      (os.path.join(locked, "chat.db"),
                       "^chat: --db .* is not writable")]
        self.assertAllRefused(1, [(("server", "--port", "0", "--db", path),
                                   pattern) for path, pattern in cases])

    def test_tls_file_mistakes(self):
        cert, key = self.certificate()
        other_key = self.certificate("other")[1]
        missing = os.path.join(self.tmp.name, "missing.pem")
        self.assertAllRefused(1, [
            (("server", "--port", "0", "--db", ":memory:", "--tls-cert",
              cert_, "--tls-key", key_), pattern)
            for cert_, key_, pattern in (
                (missing, key, "^chat: cannot read --tls-cert .*missing"),
                (key, key, "^chat: --tls-cert .* is not a PEM certificate"),
                (cert, cert, "^chat: --tls-key .* is not a PEM private key"),
                (cert, other_key, "^chat: --tls-key .* is not the private "
                 "key of --tls-cert"))
        ] + [
            (("client", "--no-gui", "--id", "1", "--tls-ca", ca), pattern)
            for ca, pattern in (
                (missing, "^chat: cannot read --tls-ca .*missing"),
                (key, "^chat: --tls-ca .* is not a PEM certificate"))
        ])

    def test_grpc_core_log_lines_stay_out_of_the_terminal(self):
        cert, key = self.certificate()
        server = self.start_server("--tls-cert", cert, "--tls-key", key)
        plaintext = self.start("client", "--no-gui", "--id", "1",
                               "--server", server.address)
        self.assertEqual(plaintext.finish(), 1)
        self.stop_server(server)
        for process in (plaintext, server):
            for line in process.output("stderr"):
                self.assertNotRegex(line, self.CORE_LOG_LINE)

    def test_second_server_on_the_same_port_is_refused(self):
        first = self.start_server("--members", "1,2")
        port = first.port
        other_db = os.path.join(self.tmp.name, "other.db")
        self.assertAllRefused(1, [
            (("server", "--port", port, "--db", other_db),
             f"^chat: port {port} is already in use"),
            (("bench.py", "baseline", "--port", port),
             f"^bench.py baseline: port {port} is already in use"),
            (("server", "--port", "0", "--db", ":memory:",
              "--host", "192.0.2.1"),  # a documentation address
             "^chat: --host 192.0.2.1 is not an address of this machine"),
        ])
        alice = self.start_client(first, "1", "alice")  # first still serves
        bob = self.start_client(first, "2", "bob")
        alice.type("still here")
        bob.wait_for("alice: still here", stream="stdout")


def help_of(command, script=CHAT):
    """What `python script command --help` prints."""
    return subprocess.run([sys.executable, script, command, "--help"],
                          capture_output=True, text=True, check=True,
                          timeout=WAIT).stdout


class CommandLineTest(unittest.TestCase):
    """What README quotes must stay true of the code."""

    def test_readme_names_only_tests_that_exist(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            quoted = set(re.findall(r"`(test_\w+|\w+Test)`", f.read()))
        with open(os.path.join(HERE, "test_chat.py"), encoding="utf-8") as f:
            defined = set(re.findall(r"(?:def|class) (\w+)", f.read()))
        self.assertTrue(quoted)
        self.assertEqual(quoted - defined, set())

    def test_readme_synopsis_is_the_usage_line(self):
        """Each flag in README's synopsis with the metavar --help shows."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read().split("## Command line", 1)[1]
        flag = r"(--[a-z-]+)(?: ([^\]\s-][^\]\s]*))?"
        for command in ("server", "client"):
            synopsis = re.search(rf"^python chat.py {command} [\[-].*?\n(?! )",
                                 readme, re.S | re.M).group()
            usage = help_of(command).split("\n\n")[0]
            self.assertEqual(set(re.findall(flag, synopsis)),
                             set(re.findall(flag, usage)) - {("--help", "")})

    def test_readme_quotes_the_real_help(self):
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        for command in ("server", "client"):
            for flag in re.findall(r"--[a-z-]+", help_of(command)):
                self.assertTrue(flag in readme,
                                f"README does not explain {flag}")


# Most of a test's time is spent waiting for its processes, so the classes
# run three at a time (CHAT_TEST_WORKERS=1: one at a time). Each class runs
# whole on one thread, with its setUpClass and tearDownClass, into a result
# of its own that records what happened; these are then told to unittest's
# result in unittest's own order, as if the classes had run one by one.

class Recording(unittest.TestResult):
    """A result that keeps each call made to it, to replay them later."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def replay(self, result):
        for name, args in self.calls:
            getattr(result, name)(*args)


for _name in ("startTest", "stopTest", "addSuccess", "addFailure", "addError",
              "addSkip", "addExpectedFailure", "addUnexpectedSuccess",
              "addSubTest"):
    setattr(Recording, _name, lambda self, *args, _name=_name:
            self.calls.append((_name, args)))


class ConcurrentSuite(unittest.TestSuite):
    def run(self, result, debug=False):
        workers = int(os.environ.get("CHAT_TEST_WORKERS", "3"))

        def run_class(suite):
            recording = Recording()
            suite.run(recording)
            return recording
        with futures.ThreadPoolExecutor(max(workers, 1)) as pool:
            for recording in pool.map(run_class, self):
                recording.replay(result)
                if result.shouldStop:  # failfast: start no more classes
                    pool.shutdown(cancel_futures=True)
                    break
        return result


def load_tests(loader, tests, pattern):
    """unittest's hook: this module's tests, one suite per class."""
    return ConcurrentSuite(tests)


if __name__ == "__main__":
    unittest.main()
