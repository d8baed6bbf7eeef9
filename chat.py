"""chat.py: a group chat over gRPC, in one file you can read top to bottom.

One server process holds one chat room. A fixed group of members (ids 1, 2, 3
with --members 1,2,3) each run a client process. The running example, used
where the message passes in each section, in the tests and in README:

    alice (id 1) sends "hi" while bob (id 2) is offline; it is stored as
    seq 7. Later bob comes online and gets "hi", because he has not read it
    yet. alice does not get her own "hi" back. A stranger (id 9) is refused
    and gets nothing.

The path of alice's "hi", hop by hop, with the section (§) of each. With
CHAT_TRACE=1, every process prints a line at each hop, naming its thread
(README, "Watch a message travel"), and test_chat.py checks that they come
in this order. "(III)" marks the hops through Part III's classes, which
the default server and client take; "(plain)" the Part I hop they replace,
which --plain takes. Both servers serialize once (SerializedOnce, with
parsed_as); a file cut after Part I has ChatRoomServicer.wire (§5) hand
gRPC the Event itself.

  alice   TerminalClient.queue_message  §8   its stdin thread (TerminalClient
                                             ._read) puts the typed line in
                                             the outbox
          TerminalClient._send_messages §8   the main thread takes it out
          ChatClient.send               §7   a blocking unary call: Send -->
  server  ChatRoomServicer.Send         §5   checks it (parsed_as first, III)
          Store.append                  §3   commits it: "hi" is seq 7
          ChatRoomServicer._fan_out     §5   one pb.Event for all but alice
          SerializedOnce.wire           §11  (III) serialized once, for all
          Hub.publish                   §4   (plain) into each online
                                             member's queue
          RoundsHub.publish             §11  (III) the same, in the loop's
          RoundsHub._round              §11  next round
  alice   ChatClient.send               §7   <-- returns SendReply(seq=7)
  bob was offline: later his ChatClient._receive thread calls _join, Join -->
  server  ChatRoomServicer._replay      §5   after _admit and _go_online,
          SerializedOnce.wire           §11  his Join writes "hi" (III: bytes)
  or bob was online: "hi" went into his Session's queue, and
          CoalescingSession.next_write  §11  (III) takes all that waits there
          ChatRoomServicer.Join         §5   his Join's live loop writes it
  bob     ChatClient._read              §7   his receive thread gets it
          ChatClient._take              §7   keeps what is new for the UI
          TerminalClient.on_event       §8   prints format_message's
                                             "[14:02:07] alice: hi"
          ReadReceipts._start           §7   MarkRead(up_to_seq=7) -->: at
                                             once, or (III) 2.5 to 7.5 s
                                             later, when ThrottledReadReceipts
                                             ._due (§12) calls it on its
                                             timer thread
  server  ChatRoomServicer.MarkRead     §5
          Store.mark_read               §3   7 is read now (III: saved
                                             within a second, as
                                             BatchedReadsStore.save_reads
                                             saves them together)

The sections are in bottom-up order: the server from its storage outwards
(3 to 6), then the client from the network up to the screen (7 and 8).

The file is in layers, each complete: cut it before any part's banner
(keeping the closing `if __name__` lines) and what is left runs. A later
part extends an earlier one only by subclasses and by one hook on the
command line (EXTENSIONS, section 9); nothing refers forward.

Part I, the chat (a complete chat that keeps every promise in README), in
two sittings: the server (1 to 6), then the client and the command line:

    1. The vocabulary      chat.proto, loaded when the program starts
    2. The rules           limits and input checks shared by both sides
    3. The store           SQLite: history, read positions, retry ids
    4. The hub             who is online; a queue per member; fan-out
    5. The servicer        the four RPCs: Join, Send, MarkRead, ListMembers
    6. Serving             the grpc.aio server, its completion queue, start-up
    7. The client          channel, stub, the receive thread, read receipts
    8. The terminal client stdin -> Send, Join stream -> stdout
    9. The command line    argparse, run_server, run_client, main(argv)

Part II, the window:

   10. The window          the Tk client: threads and Tk, without polling

Part III, for a thousand members (unless `server --plain`, `client
--plain`): each measured optimization as a small subclass or mixin of a
Part I class, as socketserver's ThreadingMixIn changes its server:

   11. Serving a thousand members   CoalescingSession, RoundsHub,
                                    BatchedReadsStore, BatchedPresence,
                                    SerializedOnce, ThousandMemberServicer
   12. Read receipts for a thousand members   ThrottledReadReceipts

Appendix: Diagnose, which finds the cause of a start-up or connection
mistake where Part I gives gRPC's own words (Explain), and the demo
(`python chat.py demo`).

Where each gRPC lesson is taught:

    channels and their states          section 7's top; open_channel
    stubs and multicallables           section 7's top
    completion queues and tags         section 6's top
    the blocking call's own queue      section 7's top
    the channel's spin thread          section 7's top; ReadReceipts
    .future() and done-callbacks       ReadReceipts (_start, _watch, _done)
    the aio poller and the event loop  section 6's top
    streaming writes, flow control     ChatRoomServicer.Join; Session.close
    status codes and abort             section 5's top; _refuse; RETRY
    metadata (the room password)       PASSWORD_KEY; _check_password
    deadlines and wait_for_ready       SEND_TIMEOUT; ChatClient._join, _read
    keepalive, on both sides           server_options; CLIENT_OPTIONS
    cancellation                       ChatRoomServicer.Join; ChatClient.close
    TLS                                tls_credentials; open_channel
    mutual TLS and auth_context        tls_credentials; certified_id
    Tk and threads                     section 10's top; ChatWindow._post
    serializing once, raw bytes        SerializedOnce; chat_room_handlers
    batching writes (Part III)         CoalescingSession, RoundsHub

The server uses grpc.aio: one asyncio event loop runs every handler, for
any number of streams. The client uses grpc's threaded API (blocking calls,
and a thread that reads the stream), as a terminal or a Tk window has a
main loop of its own. So the file shows both of grpcio's APIs, and how
each waits for the network.
"""

import argparse
import asyncio
import collections
import datetime
import errno
import gc
import getpass
import hmac
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import uuid

# gRPC's core (C++) logs to stderr on its own ("E1127 12:00:00.000 ...
# Invalid private key."). What matters reaches us as an exception or a
# status code, which we turn into a sentence, so core stays quiet unless you
# set GRPC_VERBOSITY (=error shows its errors). It is read at `import grpc`.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

log = logging.getLogger("chat")


# Part I: the chat ===========================================================
#
# Every section in its plainest correct form. "Hardening" marks code that a
# promise needs against careless or hostile clients: the room password,
# flood control, the queue limit, TLS and keepalive.


# 1. The vocabulary ----------------------------------------------------------
#
# protos_and_services() runs protoc in this process (it needs grpcio-tools)
# and returns the modules it would write to chat_pb2.py and chat_pb2_grpc.py:
# pb, the message classes, and services (the servicer's base class,
# add_ChatRoomServicer_to_server, ChatRoomStub). chat.proto is looked up on
# sys.path, which `python chat.py` starts with chat.py's folder.
pb, services = grpc.protos_and_services("chat.proto")


# 2. The rules ---------------------------------------------------------------
#
# Checks for both sides: the server refuses bad input with INVALID_ARGUMENT
# and a sentence, a client says what is wrong before it sends. Only the
# server's check counts: a client can be anything.

MAX_TEXT_CHARS = 4000  # one message; about two pages of text
MAX_NAME_CHARS = 32
MAX_MESSAGE_ID_CHARS = 64
MAX_SEQ = 2**63 - 1  # SQLite's largest integer; seqs come from its rowid
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
RATE = 20  # flood control: messages a second per member (server --rate)
# gRPC refuses a bigger request (RESOURCE_EXHAUSTED) before our code runs;
# a message at MAX_TEXT_CHARS (16 KB of UTF-8 at most) gets our sentence.
MAX_REQUEST_BYTES = 256 * 1024
# Hardening: past this many events waiting for it (its client stopped
# reading), a member is taken offline; it catches up from its read position.
QUEUE_LIMIT = 1000

# The room password goes with every call as metadata, an HTTP/2 header: its
# value is ASCII, unless the key ends in "-bin": then bytes, which gRPC
# encodes for HTTP/2 (as they are, to a peer that takes binary headers, as
# gRPC's own do; else base64).
# A typed "é" would fail on the client (INTERNAL "Invalid metadata"), so it
# goes as UTF-8 under a -bin key, read from CHAT_PASSWORD (`ps` shows argv).
PASSWORD_KEY = "chat-password-bin"


def password_metadata(password):
    """The call metadata that carries the room password (none without one)."""
    return ((PASSWORD_KEY, password.encode()),) if password else ()


def id_problem(client_id):
    """Why client_id is not a valid member id, or None if it is."""
    if not client_id:
        return "the client id is empty; give one with --id, e.g. --id 1."
    if not ID_PATTERN.fullmatch(client_id):
        return (f"the client id {client_id[:40]!r} is not valid: use 1 to 32 "
                "letters, digits, '_', '.' or '-'.")


def name_problem(name):
    """Why name is not a valid display name, or None if it is."""
    if len(name) > MAX_NAME_CHARS:
        return (f"the name is {len(name)} characters long; the limit is "
                f"{MAX_NAME_CHARS}.")
    if not name.isprintable():
        return "the name must be one line of printable characters."
    if name and not name.strip():
        return "the name must not be only spaces."


def text_problem(text):
    """Why text cannot be sent as a message, or None if it can."""
    if not text.strip():
        return "a message needs some text; this one is empty."
    if len(text) > MAX_TEXT_CHARS:
        return (f"the message is {len(text):,} characters long; the limit is "
                f"{MAX_TEXT_CHARS:,}.")
    # Bytes that are not UTF-8 (a terminal in another encoding) come from
    # stdin as lone surrogates, which no protobuf string holds.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        return ("the message is not valid UTF-8 text; is the terminal set to "
                "another encoding?")
    # Control characters could rewrite others' terminals (clear the screen).
    if any(not ch.isprintable() and ch not in "\n\t" for ch in text):
        return ("the message contains control characters; only newlines and "
                "tabs are allowed.")


# Watching a message travel (README): with CHAT_TRACE=1, a process prints a
# line to stderr at each hop of the header's map, naming its thread:
#   trace: server Store.append seq=7 thread=MainThread (event loop)
TRACE = os.environ.get("CHAT_TRACE") == "1"


def trace(side, hop, event=None, **details):
    """Print one hop: side is "server" or "client", hop the function. An
    event (a pb.Event or its bytes) gives the seqs of its messages; one
    without messages (presence, CaughtUp) is no message's hop: no line."""
    if not TRACE:
        return
    if event is not None:
        if isinstance(event, bytes):
            event = pb.Event.FromString(event)
        if not event.messages:
            return
        first, last = event.messages[0].seq, event.messages[-1].seq
        details = {"seq": first if first == last else f"{first}-{last}",
                   **details}
    thread = threading.current_thread().name
    try:
        asyncio.get_running_loop()
        thread += " (event loop)"
    except RuntimeError:
        pass  # no event loop runs on this thread
    say_line(" ".join(["trace:", side, hop, *(
        f"{key}={value!r}" if key == "text" else f"{key}={value}"
        for key, value in details.items()), f"thread={thread}"]))


def say_line(text):
    """Write a line to stderr in one write, so that lines from several
    threads never mix (print writes its parts one by one)."""
    if sys.stderr is not None:  # None: started with stderr closed (2>&-)
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


# 3. The store ---------------------------------------------------------------
#
# What must survive a restart lives in one SQLite file. A message's seq is
# its INTEGER PRIMARY KEY, so SQLite hands out the room's single order. A
# seq means something only in the history that gave it out, as a Kafka
# offset does only in its topic: on another file (or :memory:, or from
# another folder: chat.db is relative) seq 5 is someone else's message, or
# none. So the Welcome names the history (history_id), a resuming client
# says which one its after_seq counts in, and a Join from another history
# starts over from the member's read position here, as a new client would.
#
# Durability: Send answers once its INSERT has committed, MarkRead once its
# UPDATE has. WAL mode appends each commit to chat.db-wal, and
# synchronous=FULL fsyncs that before the commit returns: an acknowledged
# message survives `kill -9` of the server and a power cut (NORMAL survives
# only the kill). The event loop calls the store and waits for each fsync
# (about 1 ms): the plainest design, and it keeps commits in seq order.

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused
    sender_id   TEXT NOT NULL,
    sender_name TEXT NOT NULL,
    text        TEXT NOT NULL,
    sent_at_us  INTEGER NOT NULL,                   -- microseconds, Unix time
    message_id  TEXT                                -- the sender's retry id
);
CREATE UNIQUE INDEX IF NOT EXISTS one_copy_per_retry
    ON messages (sender_id, message_id);            -- NULLs never collide
CREATE TABLE IF NOT EXISTS members (                -- all who ever joined
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,                         -- the last one used
    read_seq INTEGER NOT NULL DEFAULT 0  -- has all up to it: read, or its own
);
CREATE TABLE IF NOT EXISTS history (id TEXT NOT NULL);  -- one row, random
"""

Stored = collections.namedtuple(  # one row of the messages table
    "Stored", "seq sender_id sender_name text sent_at_us")
STORED_COLUMNS = ", ".join(Stored._fields)


class Store:
    """History and read positions in SQLite; every change is committed
    before the method returns. Part III overrides read_seq and save_read."""

    def __init__(self, path):
        # isolation_level=None: no hidden BEGIN; each statement commits.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=0.1)
        # EXCLUSIVE: the file stays locked while we run (the OS drops the
        # lock if we die), so a second server on it fails at start ("database
        # is locked") instead of handing out the same seqs.
        self.db.execute("PRAGMA locking_mode = EXCLUSIVE")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("INSERT INTO history SELECT ? WHERE NOT EXISTS "
                        "(SELECT * FROM history)", (uuid.uuid4().hex,))
        self.history_id = self.db.execute(
            "SELECT id FROM history").fetchone()[0]
        # In memory too, as every Join needs them: the members' last names
        # (in order of first join), and the last seq.
        self.names = dict(self.db.execute(
            "SELECT id, name FROM members ORDER BY rowid"))
        self.last_seq = self.db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0]

    def close(self):
        self.db.close()

    def remember(self, client_id, name):
        """Record that client_id has joined and now calls itself name."""
        if self.names.get(client_id) != name:  # else nothing to commit
            self.db.execute(
                "INSERT INTO members (id, name) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (client_id, name))
            self.names[client_id] = name

    def append(self, sender_id, sender_name, text, message_id):
        """Store a message (alice's "hi", as seq 7); return (Stored, is_new).
        A retried Send (same message_id) gets the stored row, is_new False.
        A sender that had read everything has read this too, in the same
        commit: a new client process of alice's then replays her "hi" only
        if something unread came before it."""
        if message_id and (row := self._select(
                STORED_COLUMNS, "sender_id = :member AND message_id = :id",
                member=sender_id, id=message_id).fetchone()):
            return Stored(*row), False
        sent_at_us = time.time_ns() // 1000
        with self.db:  # BEGIN ... COMMIT, or ROLLBACK if anything raises
            self.db.execute("BEGIN")
            seq = self.db.execute(
                "INSERT INTO messages (sender_id, sender_name, text, "
                "sent_at_us, message_id) VALUES (?, ?, ?, ?, ?)",
                (sender_id, sender_name, text, sent_at_us,
                 message_id or None)).lastrowid
            if self.read_seq(sender_id) == self.last_seq:
                self.save_read(sender_id, seq)
        self.last_seq = seq
        trace("server", "Store.append", seq=seq)
        return Stored(seq, sender_id, sender_name, text, sent_at_us), True

    def read_seq(self, client_id):
        row = self.db.execute("SELECT read_seq FROM members WHERE id = ?",
                              (client_id,)).fetchone()
        return row[0] if row else 0

    def mark_read(self, client_id, up_to_seq):
        """Move client_id's read position forward to up_to_seq (never back,
        never past the last message), and on past its own messages that
        follow; return the new position, committed."""
        if client_id not in self.names:
            return 0  # never joined: no row, no position
        before = self.read_seq(client_id)
        position = max(before, min(up_to_seq, self.last_seq))
        (after,) = self._select("MIN(seq)", "seq > :after", own=False,
                                member=client_id, after=position).fetchone()
        position = self.last_seq if after is None else after - 1
        if position != before:
            self.save_read(client_id, position)
        trace("server", "Store.mark_read", seq=position)
        return position

    def save_read(self, client_id, position):
        self.db.execute("UPDATE members SET read_seq = ? WHERE id = ?",
                        (position, client_id))

    def count_unread(self, client_id, after_seq, up_to_seq):
        """How many messages from others lie in (after_seq, up_to_seq]."""
        return self._select("COUNT(*)", "seq > :after AND seq <= :up_to",
                            own=False, member=client_id, after=after_seq,
                            up_to=up_to_seq).fetchone()[0]

    def recent(self, client_id, up_to_seq, limit):
        """The last limit messages up to up_to_seq, oldest first."""
        return [Stored(*row) for row in self._select(
            STORED_COLUMNS, "seq <= :up_to ORDER BY seq DESC LIMIT :limit",
            member=client_id, up_to=up_to_seq, limit=limit)][::-1]

    def messages_for(self, client_id, after_seq, up_to_seq, limit, resuming):
        """Up to limit messages in (after_seq, up_to_seq], oldest first, for
        client_id's replay: its own too, unless it resumes (a new client
        process has not seen them; chat.proto, JoinRequest.resuming)."""
        return [Stored(*row) for row in self._select(
            STORED_COLUMNS, "seq > :after AND seq <= :up_to "
            "ORDER BY seq LIMIT :limit", own=not resuming, member=client_id,
            after=after_seq, up_to=up_to_seq, limit=limit)]

    def may_see(self, own):
        """The one rule of which messages the member :member may see, as an
        SQL condition: all, or all but its own (own=False). Every read of
        messages applies it (_select), and ChatRoomServicer._fan_out follows
        it live: private messages would change those two places."""
        return "TRUE" if own else "sender_id != :member"

    def _select(self, columns, where, own=True, **parameters):
        """SELECT columns of the messages :member may see that match where."""
        return self.db.execute(f"SELECT {columns} FROM messages WHERE "
                               f"({self.may_see(own)}) AND {where}",
                               parameters)


# 4. The hub -----------------------------------------------------------------
#
# grpc.aio allows one write at a time per stream, and a broadcaster that
# awaited each member's write in turn would stall everyone behind the
# slowest reader. So each online member has a Session with a bounded
# asyncio.Queue, which its own Join handler drains into its stream; the hub
# only calls put_nowait(), and a full queue means that member is too far
# behind. All of it runs on the loop's thread: no locks. (alice's "hi": if
# bob is online, it lands in his queue at once, and his Join writes it.)


class Session:
    """One open Join stream: a member's queue and the task that drains it.
    Part III overrides next_write."""

    def __init__(self, client_id, name):
        self.client_id, self.name = client_id, name
        self.queue = asyncio.Queue(QUEUE_LIMIT)
        # grpc.aio runs each RPC in its own asyncio task: cancelling this
        # one (the member's Join) ends its stream and touches no other.
        self.task = asyncio.current_task()
        self.closing = None  # (code, details) once the server ends the stream

    async def next_write(self):
        """What Join writes next: the next event (waits for one)."""
        return await self.queue.get()

    def close(self, code, details):
        """End this stream with a status; runs on the loop, from any task.
        The cancel raises CancelledError in the Join handler, which sends
        the status. It queues behind what flow control let through unread
        (up to the client's HTTP/2 receive window, a few MB, which wait in
        its process): a client that stopped reading gets it when it reads."""
        if self.closing is None:
            self.closing = (code, details)
            self.task.cancel()


class Hub:
    """Who is online, and fan-out of events to their queues. Part III
    overrides add and publish, which recipients and deliver serve."""

    def __init__(self, too_slow):
        self.online = {}  # member id -> Session
        self.too_slow = too_slow  # called with a session whose queue is full

    def add(self, session):
        """Put session online, to get what is published from now on; return
        the session it replaces, if any."""
        replaced = self.online.get(session.client_id)
        self.online[session.client_id] = session
        return replaced

    def remove(self, session):
        """Take session offline. False if it was already gone or replaced."""
        if self.online.get(session.client_id) is not session:
            return False
        del self.online[session.client_id]
        return True

    def publish(self, data, skip=(), only=None):
        """Queue data for every member online but the ids in skip; or, given
        only, for that one session, if it is still online."""
        sessions = self.recipients(skip, only)
        trace("server", "Hub.publish", data, to=len(sessions))
        self.deliver(data, sessions)

    def recipients(self, skip=(), only=None):
        if only is not None:
            return [only] if self.online.get(only.client_id) is only else []
        return [session for client_id, session in self.online.items()
                if client_id not in skip]

    def deliver(self, data, sessions):
        for session in sessions:
            try:
                session.queue.put_nowait(data)
            except asyncio.QueueFull:
                # Soon, not now: too_slow() takes the member offline and
                # tells the others, a publish of its own.
                asyncio.get_running_loop().call_soon(self.too_slow, session)


# 5. The servicer ------------------------------------------------------------
#
# One method per RPC in chat.proto, named as there, each a coroutine on the
# event loop. A refusal is `await context.abort(code, sentence)`: it raises,
# ends the handler, and sends the client that status code with the sentence
# as its details (an exception left uncaught reaches it as UNKNOWN).


def to_message(stored):
    """A stored row as a pb.ChatMessage."""
    message = pb.ChatMessage(seq=stored.seq, sender_id=stored.sender_id,
                             sender_name=stored.sender_name, text=stored.text)
    message.sent_at.FromMicroseconds(stored.sent_at_us)
    return message


def certified_id(context):
    """Hardening (mutual TLS): the member id that the client's certificate
    names, its common name (CN); None if it presented none. gRPC checked
    the certificate in the handshake, and auth_context() holds what it
    found: {"x509_common_name": [b"2"], "transport_security_type":
    [b"ssl"], ...}. (peer_identities() would give the subjectAltNames
    instead, if the certificate had any.) Production systems more often
    give each user a token, sent as call credentials
    (grpc.metadata_call_credentials), which gRPC sends only on a secure
    channel."""
    names = context.auth_context().get("x509_common_name")
    return names[0].decode() if names else None

class ChatRoomServicer(services.ChatRoomServicer):
    """The room's RPCs, overriding the generated base class's (which answer
    UNIMPLEMENTED); owns the store and hub. Part III swaps in the three
    classes below, as socketserver's servers take a RequestHandlerClass, and
    overrides _announce, _go_online, _fan_out, wire and add_to."""

    store_class = Store  # what serve() opens for it
    hub_class = Hub
    session_class = Session
    server_options = []  # channel arguments of its own, for serve()
    REPLAY_BATCH = 100  # messages per Event (and per read from SQLite)
    MAX_HISTORY = 50    # most already-read messages a Welcome carries

    def __init__(self, store, members=None, max_clients=0, password=None,
                 rate=RATE):
        self.store = store
        self.hub = self.hub_class(too_slow=self._too_slow)
        # --members, the only ids that may call us, in order (a dict as an
        # ordered set); None: any valid id may.
        self.group = dict.fromkeys(members) if members else None
        self.max_clients = max_clients    # 0: no limit
        self.password = password          # None: no password
        self.rate = rate                  # messages a second; 0: no limit
        self.buckets = {}  # member id -> (tokens, time), for _check_rate
        self.closed_with = None  # (code, details) once everyone was sent off

    # -- the RPCs, in the order a member uses them --
    async def Join(self, request, context):
        """Admit the member, put it online, replay what it has not read,
        then stream live events."""
        name = await self._admit(request, context)
        session, welcome, replay = self._go_online(request, name)
        log.info("%s (%s) joined from %s; %d unread", name, request.client_id,
                 context.peer(), welcome.welcome.unread)
        # `await context.write` returns once HTTP/2 flow control lets the
        # bytes out, not when the client reads them: a client that stops
        # reading stalls only this handler, while its queue fills. We write
        # rather than `yield` so that a cancel during a write raises
        # CancelledError here, where we can still send a status (with
        # `yield`, grpc's loop around the generator gets it: no status).
        try:
            await context.write(self.wire(welcome))
            del welcome  # it lists the whole group; the stream lives on
            await self._replay(context, *replay)
            while True:  # live: bob's "hi" goes out here if he was online
                data = await session.next_write()
                trace("server", "ChatRoomServicer.Join", data)
                await context.write(data)
        except asyncio.CancelledError:
            # In a handler, a cancel means the client left (cancelled,
            # closed its channel, lost its connection), server.stop() ran out
            # of grace, or Session.close ended the stream (session.closing):
            # then the client should hear why, and abort() still sends.
            if session.closing:
                await context.abort(*session.closing)
            raise
        finally:
            if self.hub.remove(session):
                log.info("%s (%s) left", name, request.client_id)
                self._announce(session, online=False)

    async def _admit(self, request, context):
        """Refuse a Join that may not go online; return the member's name."""
        client_id = request.client_id
        await self._check_member(context, client_id)
        # No name given: the one the member used last time, else its id.
        name = request.name or self.store.names.get(client_id, client_id)
        await self._check(context, name_problem(name))
        await self._check_seq(context, request.after_seq)
        # The headers go now, before anything can end this stream: if the
        # first write carried them and was cancelled, grpc.aio would send
        # them again with the status, a batch that core refuses
        # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS): the client would get none.
        await context.send_initial_metadata(())
        # After that await, in the step that goes online: two Joins cannot
        # both take the last place, nor one come after disconnect_everyone.
        if self.closed_with:
            await self._refuse(context, *self.closed_with)
        if (self.max_clients and client_id not in self.hub.online
                and len(self.hub.online) >= self.max_clients):
            await self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the room is full: {len(self.hub.online)} of "
                f"{self.max_clients} members are online. Try again later.")
        return name

    def _go_online(self, request, name):
        """Put the member online; return its session, Welcome and _replay's
        arguments. No await: in one loop step the session goes online (gets
        every publish from now on) and head, the last seq, is read. The
        replay covers up to head, the queue what follows: no gap, no
        overlap. (bob, back, gets "hi" replayed.)"""
        client_id = request.client_id
        self.store.remember(client_id, name)
        start, resuming = self._read_up_to(request)
        head = self.store.last_seq
        session = self.session_class(client_id, name)
        if replaced := self.hub.add(session):
            # The same member again (its client reconnecting before we saw
            # the old connection die): the newest wins.
            replaced.close(grpc.StatusCode.ABORTED,
                           f"id {client_id} joined again from another client; "
                           "this session was closed.")
        if not replaced or replaced.name != name:  # new, or a new name
            self._announce(session, online=True)
        recent = self.store.recent(client_id, start,
                                   min(request.history, self.MAX_HISTORY))
        welcome = pb.Event(welcome=pb.Welcome(
            unread=self.store.count_unread(client_id, start, head),
            read_seq=start, members=self._welcome_members(client_id),
            recent=[to_message(stored) for stored in recent],
            history_id=self.store.history_id))
        return session, welcome, (client_id, start, head, resuming)

    def _read_up_to(self, request):
        """The seq up to which the member has read, in this history, and
        whether it resumes: all that a resuming client has counts as read.
        A client from another history has none of this one's messages."""
        ours = self._ours(request.history_id)
        if request.after_seq and ours:
            self.store.mark_read(request.client_id, request.after_seq)
            return min(request.after_seq, self.store.last_seq), True
        if request.after_seq:
            log.info("%s resumes from another history; it starts over from "
                     "its read position in this one", request.client_id)
        return (self.store.read_seq(request.client_id),
                ours and request.resuming)

    def _ours(self, history_id):
        """Is history_id this room's history (or not given)?"""
        return history_id in ("", self.store.history_id)

    async def _replay(self, context, client_id, start, head, resuming):
        """Write the member's messages in (start, head] (Store.messages_for),
        then CaughtUp."""
        while batch := self.store.messages_for(
                client_id, start, head, self.REPLAY_BATCH, resuming):
            event = pb.Event(messages=[to_message(stored) for stored in batch])
            trace("server", "ChatRoomServicer._replay", event)
            await context.write(self.wire(event))
            start = batch[-1].seq
        await context.write(self.wire(pb.Event(caught_up=pb.CaughtUp())))

    async def Send(self, request, context):
        """Store one message, fan it out, and answer with its seq."""
        trace("server", "ChatRoomServicer.Send", text=request.text)
        client_id = request.client_id
        await self._check_member(context, client_id)
        await self._check(context, text_problem(request.text))
        if len(request.message_id) > MAX_MESSAGE_ID_CHARS:
            await self._check(context, "message_id is longer than "
                              f"{MAX_MESSAGE_ID_CHARS} characters.")
        if (session := self.hub.online.get(client_id)) is None:
            await self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION,
                f"id {client_id} is not online; Join the room before sending.")
        await self._check_rate(context, client_id)
        stored, is_new = self.store.append(client_id, session.name,
                                           request.text, request.message_id)
        if is_new:  # in the commit's loop step, so fan-out is in seq order
            self._fan_out(stored)
        reply = pb.SendReply(seq=stored.seq)
        reply.sent_at.FromMicroseconds(stored.sent_at_us)
        return reply

    async def MarkRead(self, request, context):
        """Record that the member's client has received up to a seq."""
        trace("server", "ChatRoomServicer.MarkRead", seq=request.up_to_seq)
        await self._check_member(context, request.client_id)
        await self._check_seq(context, request.up_to_seq)
        if not self._ours(request.history_id):
            await self._refuse(
                context, grpc.StatusCode.FAILED_PRECONDITION,
                f"seq {request.up_to_seq} is from another history: this "
                "server's was reset or replaced since. Join again.")
        return pb.MarkReadReply(read_seq=self.store.mark_read(
            request.client_id, request.up_to_seq))

    async def ListMembers(self, request, context):
        """The group, and who is online (for members only)."""
        await self._check_member(context, request.client_id)
        return pb.ListMembersReply(members=self._members())

    # -- helpers --
    async def _check_member(self, context, client_id):
        """Refuse calls without the password (UNAUTHENTICATED), bad ids
        (INVALID_ARGUMENT), a client certificate's holder acting as another
        member and, with --members, every id not in it (PERMISSION_DENIED),
        even one that joined this room before."""
        await self._check_password(context)
        await self._check(context, id_problem(client_id))
        certified = certified_id(context)
        if certified is not None and certified != client_id:
            await self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED,
                f"your certificate is for member {certified}; you asked to "
                f"act as {client_id}.")
        if self.group is not None and client_id not in self.group:
            await self._refuse(
                context, grpc.StatusCode.PERMISSION_DENIED,
                f"id {client_id} is not a member of this group.")

    async def _check_password(self, context):
        """Hardening: refuse a call without the room's password (metadata).
        compare_digest takes as long for a wrong first character as for a
        wrong last one, so response times do not leak the password."""
        given = dict(context.invocation_metadata()).get(PASSWORD_KEY, b"")
        if (self.password is not None
                and not hmac.compare_digest(given, self.password.encode())):
            await self._refuse(
                context, grpc.StatusCode.UNAUTHENTICATED,
                "wrong or missing room password; set CHAT_PASSWORD to the "
                "room's password.")

    async def _check_rate(self, context, client_id):
        """Hardening (flood control): a token bucket per member, holding up
        to 2 * --rate tokens (at least one, or a --rate under 0.5 would
        refuse every Send), gaining --rate a second; a Send takes one."""
        if not self.rate:
            return
        now, most = time.monotonic(), max(1, 2 * self.rate)
        tokens, then = self.buckets.get(client_id, (most, now))
        tokens = min(most, tokens + (now - then) * self.rate)
        self.buckets[client_id] = (tokens - 1 if tokens >= 1 else tokens, now)
        if tokens < 1:
            await self._refuse(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"you are sending too fast: the limit is {self.rate} messages "
                "a second. Wait a moment and send again.")

    async def _check_seq(self, context, seq):
        if seq > MAX_SEQ:
            await self._check(context, f"seq {seq} is beyond any message.")

    async def _check(self, context, problem):
        """Refuse the call with INVALID_ARGUMENT if there is a problem."""
        if problem:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               problem)

    async def _refuse(self, context, code, sentence):
        log.info("refused %s: %s %s", context.peer(), code.name, sentence)
        await context.abort(code, sentence)  # raises: the handler ends here

    def _welcome_members(self, client_id):
        """The members client_id's Welcome lists: all, as they are now.
        (Part III's BatchedPresence lists them as its last batch did.)"""
        return self._members()

    def _members(self):
        """The group (--members), or in an open room everyone who has ever
        joined it, each with its last name and whether it is online."""
        names = self.store.names
        return [pb.Member(id=client_id, name=names.get(client_id, client_id),
                          online=client_id in self.hub.online)
                for client_id in self.group or names]

    def _announce(self, session, online):
        """Tell everyone else online that session's member came or went."""
        member = pb.Member(id=session.client_id, name=session.name,
                           online=online)
        self.hub.publish(self.wire(pb.Event(presence=[member])),
                         skip={session.client_id})

    def _fan_out(self, stored):
        """Queue a new message, one pb.Event for all, for everyone online but
        its sender, which has it from Send: Store.may_see(own=False), live."""
        event = pb.Event(messages=[to_message(stored)])
        trace("server", "ChatRoomServicer._fan_out", event)
        self.hub.publish(self.wire(event), skip={stored.sender_id})

    def wire(self, event):
        """What Join writes and the hub queues for an Event: the Event,
        which gRPC serializes at each write (SerializedOnce: its bytes)."""
        return event

    def add_to(self, server):
        """Register our RPCs with server, as every gRPC example does."""
        services.add_ChatRoomServicer_to_server(self, server)

    def _too_slow(self, session):
        """Hardening: a member whose queue is full goes offline now."""
        if session.closing:
            return  # its queue was found full more than once
        log.warning("%s (%s) fell %d events behind; disconnecting it",
                    session.name, session.client_id, QUEUE_LIMIT)
        if self.hub.remove(session):
            self._announce(session, online=False)
        session.close(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"your client fell more than {QUEUE_LIMIT} events "
                      "behind; reconnect to catch up.")

    async def disconnect_everyone(self, code, details, timeout):
        """Close every stream with a status, and refuse Joins with it from
        now on; wait (up to timeout seconds) for the statuses to go out."""
        self.closed_with = (code, details)
        sessions = list(self.hub.online.values())
        for session in sessions:
            self.hub.remove(session)  # no "left" news: nobody stays to hear it
            session.close(code, details)
        if sessions:
            await asyncio.wait([session.task for session in sessions],
                               timeout=timeout)


# 6. Serving -----------------------------------------------------------------
#
# How grpc.aio waits for the network. gRPC's core is C++ behind a C API: you
# give it a batch of operations for one call (send these headers, send this
# message, receive a message, ...) and a tag, and when the whole batch is
# done, core posts an event {tag, success} to a completion queue (CQ).
# grpc.aio keeps one CQ for the whole process:
#
#   core's threads (C++)   poller thread (GIL released)   event loop
#   --------------------   ----------------------------   ----------------
#   read sockets,     -->  grpc_completion_queue_next()   socketpair
#   finish batches         -> event; writes 1 byte  --->  readable: the
#                          to wake the loop               tag's Future
#                                                         .set_result()
#
# Every `await` on a gRPC operation (context.write, reading a request, ...)
# starts a batch whose tag wraps an asyncio Future, and awaits that Future;
# new calls come through the same queue. So 1,000 open streams cost 1,000
# suspended coroutines and their queues, not 1,000 threads. Socket reads
# happen on core's own threads (the EventEngine), unseen by Python; writes
# usually go out at once, with sendmsg() on the thread that starts the
# batch, here the event loop's, GIL held. So each context.write costs the
# loop a system call, about as much for ten messages as for one (Part III
# makes use of that). grpcio's other server, grpc.server(), runs each
# handler on a pool thread, which a stream holds for its whole life: the
# pool would cap the members online, and those over it would hang silently.

def server_options(keepalive):
    """Channel arguments for the server; keepalive is in seconds.

    Hardening, keepalive, for both sides: HTTP/2 PINGs notice a peer whose
    network vanished without a FIN or RST (a laptop lid closed), on a Join
    that may be quiet for hours. Our clients ping every 20 s
    (CLIENT_OPTIONS); the server pings a client only after `keepalive`
    seconds of hearing nothing from it, so with more than 20 s (30 by
    default) it pings only vanished ones. A ping unanswered within
    http2.ping_timeout_ms closes the connection, and its Join.
    keepalive_timeout_ms, despite its name, sets no such deadline in grpcio
    1.85: it becomes the socket's TCP_USER_TIMEOUT, which drops a peer whose
    network vanished (the ping's bytes stay unacknowledged), but not one
    whose TCP still answers while its gRPC is silent (a hung process, a
    proxy). ping_timeout_ms drops both.
    """
    timeout_ms = int(min(keepalive, 10) * 1000)
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        # A client ping sooner than this after the last is a "strike", and
        # the third closes its connection (GOAWAY "too_many_pings"); default
        # 5 minutes. Ours ping every 20 s; we allow 10 s, as timers fire
        # early and a ping 1 ms early is a strike too. permit_without_calls:
        # the same with no call open (else 2 hours).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # grpcio sets SO_REUSEPORT: a second server on our port would start
        # without an error, and the kernel would split new clients between
        # the two rooms. Off, the second one's bind fails.
        ("grpc.so_reuseport", 0),
    ]


class StartUpError(Exception):
    """A file, port or address named on the command line will not do; the
    message is one sentence. main() prints it and exits with status 1."""


class Explain:
    """The sentences for mistakes at start-up and on joining, in the words
    gRPC, SQLite and the OS give: true, if often vague. Both commands take
    theirs as args.explain; the Appendix's Diagnose finds the causes."""

    def bind(self, host, port):
        return (f"cannot listen on {host}:{port}: gRPC says only \"Failed to "
                "bind to address\" (GRPC_VERBOSITY=error shows its reason).")

    def database(self, path, error):
        return f"cannot open --db {path} ({error})."

    def check_tls_files(self, flag, cert, key=None):
        """Raise StartUpError if the PEM files will not do; here, never:
        read_pem says if one cannot be read, gRPC finds the rest."""

    def certified_id(self, cert, key, ca):
        """The member id that the client certificate cert names; here None,
        unknown: a server that sees another one in it says so."""
        return None

    def join(self, refused, target, tls=None):
        """Why the first Join failed (a Refused, section 7)."""
        if refused.code in (grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"cannot reach the server at {target}: {refused.details}"
        return f"the server refused to let you join: {refused.details}"


def read_pem(flag, path):
    """The bytes of the file that flag names."""
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as error:
        raise StartUpError(f"cannot read {flag} {path} ({error.strerror}).")


def tls_credentials(args):
    """Hardening: the server's certificate and private key, for TLS. With
    --tls-client-ca, mutual TLS: the handshake also asks each client for a
    certificate that this CA signed, and refuses one without (the client's
    call fails with UNAVAILABLE); certified_id reads whom it names."""
    args.explain.check_tls_files("--tls-cert", args.tls_cert, args.tls_key)
    client_ca = None
    if args.tls_client_ca:
        args.explain.check_tls_files("--tls-client-ca", args.tls_client_ca)
        client_ca = read_pem("--tls-client-ca", args.tls_client_ca)
    key = read_pem("--tls-key", args.tls_key)
    return grpc.ssl_server_credentials(
        [(key, read_pem("--tls-cert", args.tls_cert))],
        root_certificates=client_ca, require_client_auth=bool(client_ca))



def listen(server, host, port, credentials, explain):
    """Make server listen on host:port, with TLS given credentials; return
    the port (the one the OS picked, for port 0)."""
    address = f"{host}:{port}"
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:  # "Failed to bind to address", and no reason
        raise StartUpError(explain.bind(host, port))


async def until_stopped():
    """Wait for Ctrl-C (SIGINT) or SIGTERM, which the loop handles, so that
    no KeyboardInterrupt lands in a gRPC callback. Then both are ignored
    while we shut down: a second one would land as the loop closes, as a
    KeyboardInterrupt or in a wakeup fd already closed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)


async def serve(args):
    """Run the server until SIGINT or SIGTERM; return the exit status.
    Raises StartUpError if it cannot start."""
    credentials = tls_credentials(args) if args.tls_cert else None
    servicer_class = args.servicer_class  # Part I's, or Part III's
    server = grpc.aio.server(options=server_options(args.keepalive)
                             + servicer_class.server_options)
    port = listen(server, args.host, args.port, credentials, args.explain)
    try:
        store = servicer_class.store_class(args.db)
    except sqlite3.Error as error:
        raise StartUpError(args.explain.database(args.db, error))
    servicer = servicer_class(store, args.members, args.max_clients,
                              os.environ.get("CHAT_PASSWORD") or None,
                              args.rate)
    servicer.add_to(server)
    await server.start()
    print(f"listening on {args.host}:{port}", flush=True)  # tests wait for it
    # The full path: chat.db is relative, and another folder is another room.
    where = ("memory only (:memory:)" if args.db == ":memory:"
             else os.path.abspath(args.db))
    log.info("%s; %s; history in %s; %s; %s",
             f"serving with {servicer_class.__name__}",
             f"only ids {', '.join(servicer.group)} may join"
             if servicer.group else "open room: any id may join", where,
             "plaintext (no TLS)" if credentials is None else
             "TLS, with client certificates" if args.tls_client_ca else "TLS",
             "password required" if servicer.password else "no password")
    await until_stopped()
    # Tell every client why its stream ends (they reconnect when we are
    # back), then let running Sends finish: stop() refuses new calls at
    # once, waits up to `grace` seconds, then cancels the rest.
    log.info("shutting down")
    await servicer.disconnect_everyone(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; your client will reconnect.", timeout=2)
    await server.stop(grace=3)
    store.close()
    log.info("stopped; %s closed", where)
    return 0


# 7. The client --------------------------------------------------------------
#
# A channel is a virtual connection to a target ("localhost:50051", a name
# that may resolve to several addresses). Creating one does no I/O: it is
# IDLE until the first call, then CONNECTING -> READY (TRANSIENT_FAILURE if
# nothing listens), and IDLE again once the server goes away. Channels of
# one process with the same target and options share one TCP connection,
# and each call (the Join stream, each Send, each MarkRead) is an HTTP/2
# stream on it: the Join that waits for events never blocks a Send.
#
# A stub (services.ChatRoomStub) holds no connection, only a multicallable
# per RPC that knows the method's name and how to (de)serialize:
# stub.Send(request) returns a SendReply, stub.Join(request) an iterator of
# Events, and stub.MarkRead.future(request) a grpc.Future, at once.
#
# The threaded API waits on completion queues too (section 6). A blocking
# call (stub.Send) makes a queue of its own, and its thread waits on it.
# Streams and .future() calls share one queue per channel: the first starts
# a "channel spin" thread that takes the events off it and wakes the waiter
# (our receive thread, in `for event in call`). Both wait in slices (0.1 s
# and 0.2 s), so even an idle client wakes at least 15 times a second.

# Keepalive (server_options, section 6, explains it): ping every 20 s, even
# when all is quiet, so that a vanished server is noticed within about 30 s.
CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # else 1 a minute after 2
    ("grpc.keepalive_permit_without_calls", 1),  # also between two Joins
    # Between attempts to connect, wait 1 s, then 1.6 times longer each
    # time, up to 5 s (gRPC's 120 s is too long for a restarted chat).
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

# wait_for_ready, three ways. Without it a call fails (UNAVAILABLE) as soon
# as the channel's attempt to connect fails; with it the call waits, through
# the channel's retries, until it connects or the call's deadline passes.
#   Send            waits, with a deadline (SEND_TIMEOUT) per attempt: it
#                   rides out a reconnect, but never hangs without an answer.
#   the first Join  does not wait: a wrong address or a stopped server is
#                   told at once; CONNECT_TIMEOUT bounds a server that hangs.
#   a rejoin        waits, without a deadline: the server exists, and the
#                   channel's own backoff paces the attempts.
SEND_TIMEOUT = 10  # seconds per attempt
CONNECT_TIMEOUT = 10  # seconds the first Join may wait for its Welcome


# TLS, the client's side: the PEM file of the certificate (or its CA) that
# the server must present, and for a server that asks members to prove who
# they are (mutual TLS, tls_credentials), the member's own and its key.
ClientTLS = collections.namedtuple("ClientTLS", "ca cert key",
                                   defaults=(None, None))


def open_channel(target, tls=None):
    """A channel to target: plaintext, or TLS given a ClientTLS."""
    if tls is None:
        return grpc.insecure_channel(target, options=CLIENT_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        read_pem("--tls-ca", tls.ca),
        tls.key and read_pem("--tls-key", tls.key),
        tls.cert and read_pem("--tls-cert", tls.cert))
    return grpc.secure_channel(target, credentials, options=CLIENT_OPTIONS)


# The status codes after which the client tries again:
#   UNAVAILABLE: the server is down or restarting, or the network dropped.
#   RESOURCE_EXHAUSTED: the server closed a Join stream we fell behind on
#     (we catch up from where we are), or a Send came faster than --rate
#     allows (we wait, then resend it).
#   DEADLINE_EXCEEDED on a Send: stored or not, we cannot know; a retry
#     carries the same message_id, so at most one copy is stored.
#   FAILED_PRECONDITION on a Send, "not online": the server restarted and
#     our Join is not redone yet.
#   CANCELLED, not by us (we check that first): a server too busy to take
#     the call in time; gRPC's core cancels a call that waits too long. (A
#     CancelledError in a server handler is another thing: the client left,
#     the server is stopping, or Session.close ended the stream.)
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.DEADLINE_EXCEEDED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED}


class Refused(Exception):
    """The server said no, for a reason a person should read."""

    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class ReadReceipts:
    """Tells the server with MarkRead which messages have arrived, so that
    the next run does not show them again as unread: after each batch, all
    up to the highest seq so far (bob's client, having shown alice's "hi",
    sends MarkRead(up_to_seq=7)). At most one MarkRead is on its way. One
    that fails (the server is away) is redone after the next message, and
    each Join records its after_seq as read anyway. Part III's
    ThrottledReadReceipts overrides _start and flush."""

    def __init__(self, stub, client_id, metadata):
        self._stub, self._client_id, self._metadata = stub, client_id, metadata
        self._changed = threading.Condition()  # guards everything below
        self._history_id = ""  # the history these seqs count in
        self._received = 0   # highest seq that arrived
        self._confirmed = 0  # highest seq the server has stored as read
        self._call = None    # the MarkRead on its way, if any
        self._sending = 0    # its up_to_seq
        self._stopped = False  # flush() is over: start no more

    def joined(self, read_seq, history_id):
        """At each Welcome: our read position now, in history_id's seqs."""
        with self._changed:
            self._received = self._confirmed = read_seq
            self._history_id = history_id

    def received(self, seq):
        """Messages up to seq have arrived (on the receive thread)."""
        with self._changed:
            self._received = max(self._received, seq)
            call = self._start()
        self._watch(call)

    def flush(self, timeout):
        """On leave: confirm what is left, wait up to timeout seconds for
        the last MarkRead, and start no more."""
        self.received(0)
        with self._changed:
            self._changed.wait_for(lambda: self._call is None, timeout)
            self._stopped = True

    def _start(self):
        """Start a MarkRead up to the highest seq received, unless one is on
        its way or nothing is new; return it. Hold the lock."""
        if (self._call is not None or self._stopped
                or self._received <= self._confirmed):
            return None
        self._sending = self._received
        trace("client", "ReadReceipts._start", seq=self._received)
        # .future() returns at once: none of our threads waits for the round
        # trip (the channel's spin thread takes its completion).
        self._call = self._stub.MarkRead.future(
            pb.MarkReadRequest(client_id=self._client_id,
                               up_to_seq=self._received,
                               history_id=self._history_id),
            timeout=SEND_TIMEOUT, metadata=self._metadata)
        return self._call

    def _watch(self, call):
        """Have _done run when call completes, on the channel's spin thread;
        or, if it has already, at once, right here: so not under the lock."""
        if call is not None:
            call.add_done_callback(self._done)

    def _done(self, call):
        """A MarkRead completed: start the next, if more arrived meanwhile."""
        with self._changed:
            self._call = next_call = None
            if call.code() == grpc.StatusCode.OK:
                self._confirmed = max(self._confirmed, self._sending)
                next_call = self._start()
            self._changed.notify_all()
        self._watch(next_call)


class ChatClient:
    """The client's side of the protocol, with no user interface: it joins,
    reads the Join stream on a receive thread (joining again when it
    breaks), sends messages, and confirms what arrived with `receipts`.
    The UI gives it two callbacks, called on the receive thread, not its own:
      on_event(event, notices)  each pb.Event, in order, without repeats;
          notices are sentences for its presence changes ("bob joined",
          "bob left", "alice is now known as alice2")
      on_status(state, text)  "online", "reconnecting" or "closed", and a
          sentence that says why; only when either changes.
    An empty name asks the server for the one it remembers for our id."""

    def __init__(self, target, client_id, name, on_event, on_status,
                 history=0, password=None, tls=None,
                 receipts=ReadReceipts):
        self.client_id, self.name = client_id, name  # once in, the server's
        self.history = history  # already-read messages to ask for, once
        self.on_event, self.on_status = on_event, on_status
        self.channel = open_channel(target, tls)
        self.stub = services.ChatRoomStub(self.channel)
        # Call metadata: key/value pairs sent with a call, like HTTP headers
        # (keys must be lowercase). Every call carries the room password.
        self.metadata = password_metadata(password)
        self.receipts = receipts(self.stub, client_id, self.metadata)
        self.last_seq = 0       # highest seq received: where to resume from
        self.history_id = ""    # the history last_seq counts in
        self.left_behind = {}   # other histories we had: id -> last_seq
        self.joined = False     # a Welcome came: later Joins resume
        self.roster = {}        # member id -> (name, online), as we know it
        self.away_since = None  # time.monotonic() when we lost the server
        self.refusal = None     # the Refused that ended the session
        self._state, self._why = "connecting", ""  # as told to on_status
        self._gave_up = False   # the first Join had no answer in time
        self._delays = retry_delays()  # between Joins; new at a Welcome
        self._changed = threading.Condition()
        self._call = None       # the current Join call, to cancel on close
        self._leaving = False
        self._thread = threading.Thread(target=self._receive, daemon=True,
                                        name="receive")

    def start(self):
        """Start joining in the background; on_status tells how it went."""
        self._thread.start()

    def connect(self):
        """Join; block until the replay of unread messages is over, or we
        lost the server again. Raises Refused if we cannot get in."""
        self.start()
        self._wait_for("online", "reconnecting")

    def send(self, text):
        """Send one message; block until the server has stored it, and
        return its SendReply (alice's send("hi") returns seq=7). Retries
        with the same message_id, so never twice; raises Refused."""
        if problem := text_problem(text):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        trace("client", "ChatClient.send", text=text)
        request = pb.SendRequest(client_id=self.client_id, text=text,
                                 message_id=uuid.uuid4().hex)
        delays = retry_delays()
        while True:
            self._wait_for("online")
            try:
                reply = self.stub.Send(request, timeout=SEND_TIMEOUT,
                                       wait_for_ready=True,
                                       metadata=self.metadata)
                trace("client", "ChatClient.send", seq=reply.seq)
                return reply
            except grpc.RpcError as error:
                if error.code() not in RETRY:
                    raise Refused(error.code(), error.details()) from None
                self._pause(next(delays))

    def list_members(self, timeout=SEND_TIMEOUT):
        """[pb.Member], for /who and the window's name dialog."""
        request = pb.ListMembersRequest(client_id=self.client_id)
        try:
            return self.stub.ListMembers(request, timeout=timeout,
                                         metadata=self.metadata).members
        except grpc.RpcError as error:
            raise Refused(error.code(), error.details()) from None

    def close(self):
        """Leave: stop the stream, confirm what we read, close the channel.
        Call it from the UI thread, never from a callback."""
        with self._changed:
            self._leaving = True
            self._changed.notify_all()
            call = self._call
        if call is not None:
            call.cancel()  # the receive thread wakes with CANCELLED
        if self._thread.is_alive():
            self._thread.join()
        # With the server away, no MarkRead can reach it: do not wait.
        self.receipts.flush(timeout=0 if self.away_since is not None else 5)
        self.channel.close()

    def _wait_for(self, *states):
        """Block until the state is one of states; raise Refused once the
        server has ended the session, or close() is called."""
        with self._changed:
            self._changed.wait_for(lambda: self._leaving
                                   or self._state in states + ("closed",))
            if self._state == "closed":
                raise self.refusal
            if self._leaving:
                raise Refused(grpc.StatusCode.CANCELLED, "leaving the room.")

    def _pause(self, seconds):
        """Wait before trying again; close() cuts the wait short."""
        with self._changed:
            self._changed.wait_for(lambda: self._leaving, seconds)

    def _set_state(self, state, text=""):
        with self._changed:
            if (self._state, self._why) == (state, text):
                return  # e.g. the same refusal of each rejoin
            self._state, self._why = state, text
            self._changed.notify_all()
        self.on_status(state, text)

    # -- the receive thread --
    def _receive(self):
        """Join, read the Join stream, and join again whenever it breaks,
        resuming after the last seq we have; stop when we leave, or when
        the server turns us away."""
        while (call := self._join()) is not None:
            error = self._read(call)
            if self._leaving:
                return
            if self._gave_up and not self.joined:
                self.refusal = Refused(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer within {CONNECT_TIMEOUT} s.")
            elif error is not None and (not self.joined
                                        or error.code() not in RETRY):
                self.refusal = Refused(error.code(), error.details())
            if self.refusal is not None:
                self._set_state("closed", self.refusal.details)
                return
            if self.away_since is None:
                self.away_since = time.monotonic()
            self._set_state("reconnecting", why_lost(error))
            self._pause(next(self._delays))

    def _join(self):
        """Start a Join call and return it; None if we are leaving. (bob's
        client, back after a break with "hi" in hand, sends after_seq=7.)"""
        request = pb.JoinRequest(
            client_id=self.client_id, name=self.name,
            after_seq=self.last_seq, resuming=self.joined,
            history=0 if self.joined else self.history,
            history_id=self.history_id)
        with self._changed:
            if self._leaving:
                return None
            self._call = self.stub.Join(request, wait_for_ready=self.joined,
                                        metadata=self.metadata)
            return self._call

    def _read(self, call):
        """Take each Event of the stream until it ends; return the RpcError
        that ended it, or None if the server ended it with OK."""
        # A stream lives for hours, so it has no deadline. But gRPC gives
        # each attempt to connect 20 s (the default of
        # grpc.min_reconnect_backoff_ms, which we leave unset: not a backoff,
        # despite its name), and waits forever on a server that is connected
        # but hung. So a timer cancels (from its own thread) a first Join
        # that has no Welcome within CONNECT_TIMEOUT.
        no_answer = threading.Timer(CONNECT_TIMEOUT, self._give_up, [call])
        if not self.joined:
            no_answer.start()
        try:
            for event in call:  # the spin thread wakes us for each Event
                trace("client", "ChatClient._read", event)
                if event.HasField("welcome"):
                    no_answer.cancel()
                self._take(event)
        except grpc.RpcError as error:
            return error
        finally:
            no_answer.cancel()
        return None

    def _give_up(self, call):  # on the timer's thread: no Welcome in time
        self._gave_up = True
        call.cancel()  # the receive thread wakes with CANCELLED

    def _take(self, event):
        """Keep what the event tells us, hand what is new in it to
        on_event, then confirm its messages."""
        if event.HasField("welcome"):
            notices = self._welcome(event.welcome)
        else:
            notices = self._news(event.presence)
            if event.presence and not notices:
                return  # no news in it for us
        if event.HasField("caught_up"):
            self.away_since = None
            self._set_state("online")
        if event.messages:  # drop those we have (ours sends none twice)
            fresh = [m for m in event.messages if m.seq > self.last_seq]
            if not fresh:
                return
            del event.messages[:len(event.messages) - len(fresh)]
            self.last_seq = fresh[-1].seq
        trace("client", "ChatClient._take", event)
        self.on_event(event, notices)
        if event.messages:
            self.receipts.received(self.last_seq)

    def _welcome(self, welcome):
        """Take the Welcome in; return the notices it calls for."""
        notices = []
        if self.joined and welcome.history_id != self.history_id:
            # Our seqs count in a history the server no longer has (section
            # 3): start over in this one, and keep our place in the other,
            # should it come back.
            self.left_behind[self.history_id] = self.last_seq
            notices.append("the server's history is not the one this "
                           "client had (it was reset or replaced); starting "
                           "over from your read position in it")
        self.joined = True
        self._delays = retry_delays()
        self.roster = {m.id: (m.name, m.online) for m in welcome.members}
        if self.client_id in self.roster:  # with the name it gave us
            self.name = self.roster[self.client_id][0]
        self.history_id = welcome.history_id
        self.receipts.joined(welcome.read_seq, welcome.history_id)
        self.last_seq = max(welcome.read_seq,
                            self.left_behind.pop(welcome.history_id, 0))
        return notices

    def _news(self, presence):
        """Keep the roster; return a sentence for each presence change that
        is news to us (our server sends no other kind, but not every server
        need be ours)."""
        notices = []
        for member in presence:
            state = (member.name, member.online)
            before = self.roster.get(member.id)
            if member.id != self.client_id and before != state:
                if before and before[1] and member.online:
                    notices.append(f"{before[0]} is now known as "
                                   f"{member.name}")
                else:
                    notices.append(f"{member.name} "
                                   f"{'joined' if member.online else 'left'}")
            self.roster[member.id] = state
        return notices


def why_lost(error):
    """A sentence for a broken Join stream (error None: ended with OK).
    Our server's details are sentences, with a period; gRPC's ("Socket
    closed") are not, and mean that the connection broke."""
    if error is None:
        return "the server ended the stream."
    if error.details().endswith("."):
        return error.details()
    return "the server or the network went away."


def retry_delays():
    """Waits between retries, in seconds: 0.5, doubling up to 8, each +-20%
    so that the clients of a restarted server do not all retry at once."""
    delay = 0.5
    while True:
        yield delay * (0.8 + 0.4 * random.random())
        delay = min(delay * 2, 8.0)


# The commands, the same in every UI: a line that starts with / is one of
# these, run at once and never sent; "//" sends the rest with one / removed.
# To add one (README's exercise: "/me waves"), add it here, then its method
# to TerminalClient and ChatWindow.
COMMANDS = {
    "/help": "lists the commands",
    "/who": "lists the members and who is online",
    "/quit": "leaves once every message typed so far is stored (the "
             "window asks, if some are not)",
}


def typed(line):
    """(command, the rest of the line) for a command, else (None, the
    text to send)."""
    if line.startswith("/") and not line.startswith("//"):
        command, _, rest = line.partition(" ")
        return command, rest
    return None, line.removeprefix("/")  # "//x" sends "/x"


def command_problem(command):
    """Why command is not one, or None if it is."""
    if command in COMMANDS:
        return None
    return (f"{command} is not a command; /help lists them; start a line "
            "with // to send it as text.")


def help_lines():
    return (["commands:"]
            + [f"  {command:<7}{what}" for command, what in COMMANDS.items()]
            + ["  //...  sends a line that starts with / (one / removed)"])


def who_line(chat):
    """/who's answer: "members: alice (1, online), bob (2)". Blocks for a
    ListMembers call, so never on a UI's own thread."""
    try:
        members = chat.list_members()
    except Refused as refused:
        return f"/who failed: {refused.details}"
    except ValueError:  # the channel was closed: we are leaving
        return "/who failed: leaving the room."
    return "members: " + ", ".join(
        f"{m.name} ({m.id}{', online' if m.online else ''})" for m in members)


# 8. The terminal client -----------------------------------------------------
#
# The contract that scripts and the tests rely on:
#   stdin   one message a line, or a command (section 7); "/quit" or end of
#           input leaves once all typed so far is stored.
#   stdout  chat messages only, one a line: "[14:02:07] alice: hi".
#   stderr  everything else.
#   exit    0 after a normal leave; 1 with a one-line reason when the server
#           refuses the join, cannot be reached or closes the session, or
#           when Ctrl-C leaves messages unsent.
# Three threads: the stdin thread reads lines, runs commands at once and
# queues messages; the main thread sends them in order, each once the last
# is stored; ChatClient's receive thread prints what arrives. While the
# server is away, a fourth says "still reconnecting" now and then.

def shown_time(timestamp):
    """A pb Timestamp in this computer's time: '14:02:07' today, else
    '2026-11-03 14:02'."""
    when = datetime.datetime.fromtimestamp(timestamp.ToMicroseconds() / 1e6)
    if when.date() == datetime.date.today():
        return f"{when:%H:%M:%S}"
    return f"{when:%Y-%m-%d %H:%M}"


def format_message(message):
    """alice's "hi" as (text, kind) chunks, for both UIs to show:
    [("[14:02:07] ", "time"), ("alice: ", "name"), ("hi", "text")], at
    shown_time()."""
    return [(f"[{shown_time(message.sent_at)}] ", "time"),
            (f"{message.sender_name}: ", "name"), (message.text, "text")]


def one_line(chunks):
    """The terminal's form of format_message's chunks: "[14:02:07] alice:
    hi", with a newline inside as '\\n', so that each stays on one line."""
    return "".join(text for text, _kind in chunks).replace("\n", "\\n")


def plural(count, noun):
    """'1 message', '2 messages'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration(seconds):
    """'15 s', '2 min 5 s', '1 h 3 min'."""
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def quoted(line):
    """How a refusal names the line it refers to: 'hi', shortened."""
    return repr(line if len(line) <= 20 else line[:20] + "...")


class TerminalClient:
    """stdin/stdout/stderr front end for ChatClient."""

    AWAY_NOTE = 15  # seconds away before the first "still reconnecting"
    TTY_LINE = 4095  # Linux's terminal keeps at most this much of a line
    say = staticmethod(say_line)

    def __init__(self, target, client_id, name, password=None, tls=None,
                 receipts=ReadReceipts, explain=Explain()):
        self.target, self.client_id, self.tls = target, client_id, tls
        self.receipts, self.explain = receipts, explain
        self.chat = self._client(name, password)
        self.may_ask_password = password is None
        self.unread = 0      # from the last Welcome
        self.outbox = queue.Queue()  # messages typed; None: time to leave
        self.lock = threading.Lock()  # for the next three
        self.unsent = 0      # messages typed and not yet stored or refused
        self.leaving = False  # /quit or end of input was read
        self.back = threading.Event()  # set while the server is not away
        self.back.set()

    def _client(self, name, password):
        return ChatClient(self.target, self.client_id, name, self.on_event,
                          self.on_status, password=password,
                          tls=self.tls, receipts=self.receipts)

    def run(self, stdin):
        """Join, send each message, leave. Returns the exit status."""
        try:
            self._join(stdin)
            threading.Thread(target=self._read, args=(stdin,), daemon=True,
                             name="stdin").start()
            self._send_messages()
        except Refused as refused:  # from connect(): never got in
            self.say("chat: " + self.explain.join(refused, self.target,
                                                  self.tls))
        except KeyboardInterrupt:   # Ctrl-C: leave now, all sent or not
            pass
        with self.lock:
            self.back.set()  # no more away notes
            unsent = self.unsent
        if unsent:
            self.say(f"chat: {plural(unsent, 'message')} not sent")
        self.chat.close()
        return 1 if self.chat.refusal or unsent else 0

    def _join(self, stdin):
        """Join. On a terminal, ask for the room password if the server
        wants one that CHAT_PASSWORD did not give, as the window does."""
        while True:
            try:
                return self.chat.connect()
            except Refused as refused:
                if not (refused.code == grpc.StatusCode.UNAUTHENTICATED
                        and self.may_ask_password and stdin.isatty()):
                    raise
                wrong = "wrong password; " if self.chat.metadata else ""
                try:
                    password = getpass.getpass(
                        f"{wrong}this room needs a password: ")
                except EOFError:
                    password = ""
                if not password:
                    raise refused from None
            self.chat.close()
            self.chat = self._client(self.chat.name, password)

    # -- the stdin thread --
    def _read(self, stdin):
        """Run commands at once; queue messages for the main thread."""
        tty = stdin.isatty()
        for line in stdin:
            line = line.rstrip("\r\n")
            command, rest = typed(line)
            size = len(line.encode(errors="surrogateescape"))
            if tty and size >= self.TTY_LINE:
                self.say(f"not sent: {quoted(line)}: the terminal cut this "
                         f"line at {self.TTY_LINE:,} bytes (the limit is "
                         f"{MAX_TEXT_CHARS:,} characters).")
            elif command:
                self.command(line, command, rest)
            else:
                self.queue_message(rest)
            if self.leaving:
                return
        self.quit("")  # end of input

    def command(self, line, command, rest):
        """Run a command (COMMANDS, section 7)."""
        if problem := command_problem(command):
            self.say(f"not sent: {quoted(line)}: {problem}")
            return
        run = {"/help": self.help, "/who": self.who, "/quit": self.quit}
        run[command](rest)

    def queue_message(self, text):
        trace("client", "TerminalClient.queue_message", text=text)
        with self.lock:
            self.unsent += 1
        self.outbox.put(text)

    # The commands. Each gets the rest of its line.
    def help(self, _rest):
        self.say("\n".join(help_lines()))

    def who(self, _rest):
        self.say(who_line(self.chat))

    def quit(self, _rest):
        with self.lock:
            self.leaving = True
            self.outbox.put(None)
            self._tell_waiting()

    # -- the main thread --
    def _send_messages(self):
        """Send each queued message, in order, until it is time to leave."""
        while (text := self.outbox.get()) is not None:
            trace("client", "TerminalClient._send_messages", text=text)
            try:
                self.chat.send(text)  # blocks until stored
            except Refused as refused:
                if self.chat.refusal:  # the server closed the session
                    return
                name = f"{quoted(text)}: " if text.strip() else ""
                self.say(f"not sent: {name}{refused.details}")
            with self.lock:
                self.unsent -= 1

    def _tell_waiting(self):
        """Leaving with messages unstored while the server is away takes a
        while: say why, and the way out. Hold self.lock."""
        if self.leaving and self.unsent and self.chat.away_since is not None:
            self.say(f"waiting for the server to store "
                     f"{plural(self.unsent, 'message')} (Ctrl-C to quit "
                     f"without {'it' if self.unsent == 1 else 'them'})")

    # -- called on the receive thread --
    def on_event(self, event, notices):
        trace("client", "TerminalClient.on_event", event)
        try:
            for message in event.messages:  # bob's: "[14:02:07] alice: hi"
                print(one_line(format_message(message)), flush=True)
        except BrokenPipeError:
            # Whoever read our stdout is gone (`| head -1`): like any Unix
            # filter, leave. Later prints go to /dev/null, quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.quit("")
            return
        if event.HasField("welcome"):
            self._welcome(event.welcome)
        elif event.HasField("caught_up") and self.unread:
            self.say("-- end of unread messages --")
        for notice in notices:
            self.say(f"* {notice}")

    def _welcome(self, welcome):
        self.unread = welcome.unread
        others = [m.name for m in welcome.members
                  if m.online and m.id != self.client_id]
        news = (f"{plural(welcome.unread, 'unread message')}; "
                + (f"online: {', '.join(others)}" if others
                   else "nobody else online"))
        if self.chat.away_since is not None:  # this Join is a rejoin
            away = duration(time.monotonic() - self.chat.away_since)
            self.say(f"reconnected to {self.target} after {away}; {news}")
        else:
            self.say(f"connected to {self.target} as {self.chat.name} "
                     f"(id {self.client_id}); {news}")

    def on_status(self, state, text):
        with self.lock:
            if state != "reconnecting":
                self.back.set()  # ends the away notes, if any
            else:
                self.say(f"connection lost: {text}")
                self._tell_waiting()
                if self.back.is_set():  # just lost: start the away notes
                    self.back = threading.Event()
                    threading.Thread(target=self._away_notes, daemon=True,
                                     args=(self.back, self.chat.away_since),
                                     name="away notes").start()
        if state == "closed" and self.chat.joined:
            # The server ended our session for good (e.g. the same id joined
            # from elsewhere). Wake the main thread, which waits for a line.
            self.say(f"chat: the server closed the session: {text}")
            self.outbox.put(None)

    def _away_notes(self, back, since):
        """Runs on a thread of its own until back is set: "still
        reconnecting" at growing intervals (15 s, 30 s, 1 min, ...)."""
        wait = self.AWAY_NOTE
        while not back.wait(wait):
            with self.lock:
                if back.is_set():
                    return  # just now
                wait = time.monotonic() - since
                self.say(f"server away for {duration(wait)}; "
                         "still reconnecting")


# 9. The command line: main(argv) --------------------------------------------
#
# argparse types: each turns a flag's text into a value or refuses it with a
# sentence, which argparse prints under the command's usage ("argument
# --rate: must be 0 or more, not '-5'") before it exits with status 2.


def number(kind, rule, ok):
    """An argparse type: an int or a float (kind) for which ok(value) holds;
    rule says in words which values those are."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}")
        return value
    return parse


PORT = number(int, "a port number from 0 to 65535", lambda n: 0 <= n < 65536)
COUNT = number(int, "a whole number, 0 or more", lambda n: n >= 0)


def checked(problem):
    """An argparse type that refuses text for which problem(text) gives a
    sentence: the rule the server checks, checked here first."""
    def parse(text):
        if why := problem(text):
            raise argparse.ArgumentTypeError(why)
        return text
    return parse


valid_id, display_name = checked(id_problem), checked(name_problem)
# server --db: SQLite takes "" for a temporary file, which keeps nothing.
database = checked(lambda text: None if text else
                   "give a file name, or :memory: to keep nothing")


def member_list(text):
    """--members: '1,2,3' -> ['1', '2', '3'], each id once."""
    ids = [valid_id(part.strip()) for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("give at least one id, e.g. 1,2,3")
    return list(dict.fromkeys(ids))  # without repeats, in the order given


def server_address(text):
    """client --server: HOST:PORT. gRPC would take a mistake here for a
    server that cannot be reached, and keep trying."""
    host, _, port = text.rpartition(":")
    if "://" in text or not host:
        what = f"a URL ({text!r})" if "://" in text else repr(text)
        raise argparse.ArgumentTypeError(
            f"give HOST:PORT, e.g. 127.0.0.1:50051, not {what}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"{port!r} in {text!r} is not a port number (1 to 65535)")
    return text


# Later parts add to the command line through one hook: each appends to
# EXTENSIONS a function that takes argparse's subparsers (`commands`) and
# adds its flags and commands, or sets other defaults.
EXTENSIONS = []


def build_parser():
    parser = argparse.ArgumentParser(prog="chat.py",
                                     description="A group chat over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser(
        "server", help="run the chat server",
        description="Run the chat server: one room, until Ctrl-C.",
        epilog="A room password, if you want one, comes from the environment "
        "variable CHAT_PASSWORD, here and on every client (a flag would show "
        "in `ps`).")
    server.add_argument("--host", default="127.0.0.1", metavar="H",
                        help="address to listen on (default: %(default)s; "
                        "0.0.0.0 serves your LAN)")
    server.add_argument("--port", type=PORT, default=50051, metavar="P",
                        help="port to listen on (default: %(default)s; "
                        "0 picks a free one)")
    server.add_argument("--members", type=member_list, metavar="ID,ID,...",
                        help="comma-separated ids allowed to join, e.g. "
                        "1,2,3 (default: any id)")
    server.add_argument("--max-clients", type=COUNT, default=0, metavar="N",
                        help="most members online at once (default: 0, "
                        "no limit)")
    server.add_argument("--db", default="chat.db", type=database,
                        metavar="PATH", help="SQLite file for history and "
                        "read positions (default: %(default)s; :memory: "
                        "keeps nothing)")
    server.add_argument("--rate", default=RATE, metavar="N",
                        type=number(float, "0 or more", lambda n: n >= 0),
                        help="messages a second each member may send, with "
                        "bursts of twice that (default: %(default)s; "
                        "0: no limit)")
    server.add_argument("--keepalive", default=30, metavar="S",
                        type=number(float, "more than 0", lambda n: n > 0),
                        help="seconds of silence from a client before the "
                        "server pings it; one that does not answer is "
                        "dropped (default: %(default)s)")
    server.add_argument("--tls-cert", metavar="FILE", help="PEM certificate: "
                        "serve TLS instead of plaintext (needs --tls-key)")
    server.add_argument("--tls-key", metavar="FILE",
                        help="PEM private key for --tls-cert")
    server.add_argument("--tls-client-ca", metavar="FILE",
                        help="PEM certificate of the CA that signs members' "
                        "certificates: each client must present one, and "
                        "may act only as the id it names (needs --tls-cert)")
    server.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        metavar="LEVEL", help="DEBUG, INFO, WARNING or "
                        "ERROR (default: %(default)s)")
    server.set_defaults(func=run_server, servicer_class=ChatRoomServicer,
                        explain=Explain())
    client = commands.add_parser(
        "client", help="join the chat",
        description="Join the chat: a window, or the terminal client.",
        epilog="If the room has a password, give it in the environment "
        "variable CHAT_PASSWORD.")
    client.add_argument("--id", dest="client_id", metavar="ID",
                        type=valid_id, help="your member id: 1 to 32 "
                        "letters, digits, _ . or -, e.g. 1 (default: the "
                        "one --tls-cert names)")
    client.add_argument("--name", type=display_name, help="display name "
                        "(default: the name the server remembers for your "
                        "id, else the id)")
    client.add_argument("--server", default="127.0.0.1:50051",
                        metavar="HOST:PORT", type=server_address,
                        help="HOST:PORT of the chat server "
                        "(default: %(default)s)")
    client.add_argument("--tls-ca", metavar="FILE",
                        help="PEM certificate the server must present (its "
                        "own, if self-signed, or its CA's): use TLS")
    client.add_argument("--tls-cert", metavar="FILE",
                        help="your PEM certificate, for a server that asks "
                        "members for one (needs --tls-ca and --tls-key)")
    client.add_argument("--tls-key", metavar="FILE",
                        help="PEM private key for --tls-cert")
    client.add_argument("--no-gui", action="store_true",
                        help="use the terminal client instead of the window")
    client.set_defaults(func=run_client, receipts=ReadReceipts,
                        window=no_window, explain=Explain())
    for extend in EXTENSIONS:
        extend(commands)
    # argparse reports a flag it does not know with the top-level usage;
    # main() uses the command's own parser instead, which shows its flags.
    for command in commands.choices.values():
        command.set_defaults(parser=command)
    return parser


def run_server(args):
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        args.parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        args.parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    return asyncio.run(serve(args))


def no_window(args):
    """client's window: (exit status, None) once one has run, or (None,
    why none can open). Part I has none; Part II's open_window does."""
    return None, "this chat.py has no window (its Part II is not there)"


def run_client(args):
    args.tls = client_tls(args)
    if not args.no_gui:
        status, why_not = args.window(args)
        if why_not is None:
            return status
        print(f"chat: {why_not}; using the terminal client", file=sys.stderr)
    # Neither characters the terminal cannot show nor a line that is not
    # UTF-8 (text_problem refuses it) may crash us. None: started with
    # stdout or stdin closed (>&-, <&-).
    if sys.stdout is not None:
        sys.stdout.reconfigure(errors="replace")
    stdin = sys.stdin or open(os.devnull)
    stdin.reconfigure(errors="surrogateescape")
    client = TerminalClient(args.server, args.client_id, args.name or "",
                            os.environ.get("CHAT_PASSWORD") or None,
                            args.tls, args.receipts, args.explain)
    return client.run(stdin)


def client_tls(args):
    """client's TLS files as a ClientTLS (None: plaintext), checked; and
    args.client_id, from the certificate when --id is not given."""
    if bool(args.tls_cert) != bool(args.tls_key):
        args.parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        args.parser.error("--tls-cert needs --tls-ca, the certificate the "
                          "server must present")
    certified = None
    if args.tls_ca:
        args.explain.check_tls_files("--tls-ca", args.tls_ca)
    if args.tls_cert:
        args.explain.check_tls_files("--tls-cert", args.tls_cert,
                                     args.tls_key)
        certified = args.explain.certified_id(args.tls_cert, args.tls_key,
                                              args.tls_ca)
    if args.client_id is None and certified is None:
        args.parser.error("give your member id with --id" + (
            " (the id that --tls-cert names cannot be read here)"
            if args.tls_cert else ""))
    if certified and args.client_id and certified != args.client_id:
        raise StartUpError(f"--tls-cert {args.tls_cert} is for member "
                           f"{certified}, not --id {args.client_id}: leave "
                           "out --id, or give the certificate for "
                           f"{args.client_id}.")
    args.client_id = args.client_id or certified
    return ClientTLS(args.tls_ca, args.tls_cert, args.tls_key) \
        if args.tls_ca else None


def main(argv=None):
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except StartUpError as error:
        print(f"chat: {error}", file=sys.stderr)
        return 1


# Part II: the window ========================================================
#
# A Tk client for `client` (without --no-gui), added through Part I's one
# hook, EXTENSIONS (window_flags). Section 10 is the lesson, a plain window;
# its polish follows, as mixins that override the hooks it names.


# 10. The window -------------------------------------------------------------
#
# Tk's rule: only the thread that runs the mainloop (the main thread) may
# touch widgets. A threaded Tcl (almost every build) passes other threads'
# calls over to it, but the caller waits until the main thread gets round to
# them, and outside the mainloop (say, while the window closes) the call
# fails: "main thread is not in main loop". So only the main thread does:
#
#   receive thread (ChatClient)        main thread (Tk mainloop)
#   ---------------------------        --------------------------
#   on_event / on_status:              Tk watches the pipe's read end
#     inbox.put((method, *args))       (createfilehandler); when it is
#     write 1 byte to a pipe  ------>  readable: make each call in inbox
#
# While the mainloop waits, Tcl select()s on the display's connection and
# on every file given to createfilehandler, so the byte wakes it as a key
# press would: grpc.aio's trick (section 6), with a pipe for a socketpair.
# No timer polls the queue (but Windows has no Tk file handlers: there the
# window looks every 100 ms). Sends go to a sender thread (`outbox`), as
# ChatClient.send() blocks for a round trip, or while the server is away.

try:
    import tkinter as tk
    from tkinter import font as tkfont, messagebox, simpledialog, ttk
except ImportError:  # Python built without Tk
    tk = None


def open_root():
    """Tk's root window, and None; or None, and why no window can open
    here (DISPLAY may be set and still lead nowhere)."""
    if tk is None:
        return None, "tkinter is not installed"
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        return None, "no display (DISPLAY is not set)"
    try:
        return tk.Tk(className="chat"), None
    except tk.TclError as error:
        return None, f"cannot open a window ({error})"


def trace_view(*parts):
    """With CHAT_TRACE=1, the window also prints what it shows to stderr
    ("tk: message alice: hi new"), for test_chat.py to check."""
    if TRACE:
        say_line(" ".join(["tk:", *map(str, parts)]))


class ChatWindow:
    """client's window, in root: a name dialog, then the chat. Every method
    runs on the Tk main thread, but those whose docstrings name another.

    Hooks that the polish overrides (each calling this one by super()):
      sign_in()                    the password, and the name to offer
      _build()                     the widgets
      _show_event(event, notices)  what came on the Join stream
      _arrived(message, in_sight)  a new message from someone else shows
      name_tag(message)            the view's tag for its sender's name
      _set_title(count)            the title
      _show_state(state, text, away_since)  the connection's state
      close(ask)                   leave; ask: the user may be asked first
    """

    HISTORY = 0  # already-read messages the Welcome is to bring
    COLORS = {"notice": "grey40", "failed": "red3", "time": "grey50",
              "sending": "grey50"}

    def __init__(self, root, args):
        self.root, self.args, self.target = root, args, args.server
        self.exit_status = self.pending = self.next_own = 0  # own messages
        self.joined = self.closed = self.away = False  # away: the server
        self.inbox = queue.Queue()   # calls: worker threads -> main thread
        self.outbox = queue.Queue()  # messages: main -> sender thread
        self.wake = None             # the pipe: (read end, write end)
        if hasattr(root.tk, "createfilehandler"):
            self.wake = os.pipe()
            os.set_blocking(self.wake[1], False)
            root.tk.createfilehandler(self.wake[0], tk.READABLE,
                                      lambda *_: self._drain())
        else:  # Windows
            self._drain()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.bind("<Control-q>", lambda _event: self.close())
        root.bind("<<Quit>>", lambda _event: self.close(ask=False))

    def run(self):
        """The dialogs, then the chat until the window closes. Returns the
        exit status."""
        self.quit_on_signals()
        self.root.withdraw()  # until join: the dialogs come alone
        signed_in = self.sign_in()  # (password, the name to offer)
        name = None
        if signed_in is not None:
            password, offered = signed_in
            name = self.args.name or self.ask_name(offered)
        if name is None:  # the user cancelled
            self.close(ask=False)
            return 0
        self.join(name, password)
        self.root.mainloop()
        # The window is gone; leave the room (confirming what we received)
        # out of sight. Safe to wait for the receive thread: it never calls
        # Tk.
        self.chat.close()
        if self.pending:
            print(f"chat: {plural(self.pending, 'message')} not sent",
                  file=sys.stderr)
            return 1
        return self.exit_status

    def quit_on_signals(self):
        """Make Ctrl-C (SIGINT) and `kill` (SIGTERM) close the window, at
        once. Python runs a signal handler only when the main thread runs
        Python code, and while the mainloop waits, it sits in C; so
        set_wakeup_fd has Python's C-level handler write a byte to the wake
        pipe, and _drain runs the handler. It only queues <<Quit>>: it may
        run inside another callback, which must keep its window."""
        def handler(_signum, _frame):
            try:
                self.root.event_generate("<<Quit>>", when="tail")
            except tk.TclError:
                pass  # the window is gone already, and we are on our way
        if self.wake:
            signal.set_wakeup_fd(self.wake[1])
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, handler)

    def sign_in(self):
        """(The room password, the name that the name dialog offers), or
        None if the user cancelled: CHAT_PASSWORD's, and our id."""
        return os.environ.get("CHAT_PASSWORD") or None, self.args.client_id

    def ask_name(self, default, why=""):
        """The name dialog, again with the reason while the name will not
        do. Returns the name, or None if the user cancelled."""
        while True:
            trace_view("name dialog", default)
            name = self._dialog(simpledialog.askstring, "chat.py: your name",
                                f"{why}Your name in the chat:",
                                initialvalue=default)
            if name is None:
                return None
            default = name.strip()
            why = name_problem(default) or (
                "" if default else "please type a name.")
            if not why:
                return default
            why = f"{why[0].upper()}{why[1:]}\n"

    def join(self, name, password=None):
        """Open the chat window, and join as name. ChatClient calls its
        callbacks on the receive thread: they only post."""
        self.name = name
        self.root.deiconify()
        self._build()
        self.chat = ChatClient(
            self.target, self.args.client_id, name,
            lambda *event: self._post(self._show_event, *event),
            lambda *state: self._post(self._show_state, *state,
                                      self.chat.away_since),
            history=self.HISTORY, password=password,
            tls=self.args.tls, receipts=self.args.receipts)
        threading.Thread(target=self._send_loop, daemon=True,
                         name="sender").start()
        self._show_status(f"Connecting to {self.target}...")
        self.chat.start()

    def _build(self):
        """Lay out the window with Tk's grid: the view of messages with its
        scrollbar, the member list to its right, the message box and the
        status line below; weight=1 marks what grows with the window."""
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        outer = ttk.Frame(self.root, padding=6)
        outer.grid(sticky="nsew")
        outer.columnconfigure(0, weight=1)
        outer.rowconfigure(0, weight=1)
        # The messages: a read-only Text (_put enables it for a moment).
        self.view = tk.Text(outer, wrap="word", state="disabled", width=50,
                            height=20, padx=6, pady=4, relief="flat",
                            highlightthickness=0, cursor="arrow",
                            font="TkDefaultFont", spacing1=3)
        self.view.grid(row=0, column=0, sticky="nsew")
        self.scroll = ttk.Scrollbar(outer, command=self.view.yview)
        self.scroll.grid(row=0, column=1, sticky="ns")
        self.view.configure(yscrollcommand=self.scroll.set)
        side = ttk.Frame(outer, padding=(8, 0, 0, 0))
        side.grid(row=0, column=2, sticky="ns")
        side.rowconfigure(1, weight=1)
        ttk.Label(side, text="Members").grid(sticky="w")
        self.members = tk.Listbox(side, width=14, activestyle="none",
                                  highlightthickness=0, relief="flat",
                                  takefocus=False)
        self.members.grid(sticky="ns")
        compose = ttk.Frame(outer, padding=(0, 6, 0, 0))
        compose.grid(row=1, column=0, columnspan=3, sticky="ew")
        compose.columnconfigure(0, weight=1)
        self.entry = tk.Text(compose, height=3, wrap="word", undo=True,
                             font="TkDefaultFont")
        self.entry.grid(row=0, column=0, sticky="ew")
        self.entry.bind("<Return>", self._on_return)  # Shift+Enter too
        self.entry.bind("<KP_Enter>", self._on_return)
        self.entry.focus_set()
        # takefocus=False: a click on Send leaves the keyboard in the box.
        ttk.Button(compose, text="Send", command=self.send_typed,
                   takefocus=False).grid(row=0, column=1, sticky="ns",
                                         padx=(6, 0))
        self.status = ttk.Label(outer, anchor="w")
        self.status.grid(row=2, column=0, columnspan=3, sticky="ew",
                         pady=(4, 0))
        # Tags, named styles for the view's text: one for each kind of
        # format_message's chunks, and more.
        self.bold = tkfont.nametofont("TkDefaultFont").copy()
        self.bold["weight"] = "bold"
        self.italic = tkfont.nametofont("TkDefaultFont").copy()
        self.italic["slant"] = "italic"
        self.view.tag_configure("name", font=self.bold)
        self.view.tag_configure("notice", font=self.italic)
        self.view.tag_configure("time", font="TkSmallCaptionFont")
        self.view.tag_configure("line", lmargin2=24)
        self.view.tag_configure("more", lmargin1=24)
        for tag in ("time", "notice", "failed", "sending"):
            self.view.tag_configure(tag, foreground=self.COLORS[tag])
        self._set_title()

    def _set_title(self, count=""):
        """The title: "alice - chat at HOST:PORT", after count."""
        self.root.title(f"{count}{self.name} - chat at {self.target}")

    # -- typing, sending and commands --
    def _on_return(self, event):
        if event.state & 1:  # Shift is held: a new line
            self.entry.insert("insert", "\n")
        else:
            self.send_typed()
        return "break"  # and not Tk's newline

    def send_typed(self):
        """Send what is in the message box (Enter or the Send button), or
        run its command (COMMANDS, section 7); what is refused stays there,
        and the status line says why."""
        command, text = typed(self.entry.get("1.0", "end-1c").strip("\n"))
        problem = command_problem(command) if command else text_problem(text)
        if problem:
            self._show_status(f"Not sent: {problem}", problem=True)
            self.root.bell()
            return
        self.entry.delete("1.0", "end")
        self._show_status(self.connection)
        if command:
            run = {"/help": self.help, "/who": self.who, "/quit": self.quit}
            return run[command](text)
        self.pending += 1
        self.next_own += 1
        tag = f"own{self.next_own}"  # to find it again
        # Shown at once, at our clock's time until the server's is known.
        message = pb.ChatMessage(sender_id=self.chat.client_id,
                                 sender_name=self.name, text=text)
        message.sent_at.GetCurrentTime()
        self._put(self._chunks(message) + [("  sending...", "sending")], tag)
        self.view.see("end")  # whoever sends wants to see it
        trace_view("message", f"{self.name}: {text}", "sending")
        self.outbox.put((tag, message))

    # The commands. Each gets the rest of its line.
    def help(self, _rest):
        for line in help_lines():
            self._notice(line)

    def who(self, _rest):
        # ListMembers blocks: on a thread of its own, never Tk's.
        threading.Thread(target=lambda: self._post(
            self._notice, who_line(self.chat)), daemon=True,
            name="who").start()

    def quit(self, _rest):
        self.close()

    def _send_loop(self):
        """Runs on the sender thread: send queued messages one by one, in
        the order they were typed; report each result to the main thread.
        Once the session is over, what is left stays unsent (run() says)."""
        while True:
            tag, message = self.outbox.get()
            try:
                self._post(self._sent, tag, message,
                           self.chat.send(message.text))
            except Refused as refused:
                if not self.chat.refusal:
                    self._post(self._sent, tag, message, None,
                               f"  not sent: {refused.details}")

    def _sent(self, tag, message, reply, failed=""):
        """Stored: show the time the server gave it, which everyone sees.
        Or refused: say why."""
        self.pending -= 1
        if reply:
            message.sent_at.CopyFrom(reply.sent_at)
            trace_view("sent", reply.seq, shown_time(reply.sent_at))
        self._put(self._chunks(message) + [(failed, "failed")], tag)

    # -- from worker threads to the main thread --
    def _post(self, *call):
        """Runs on a worker thread: queue a call of one of our methods, for
        the main thread to make, and wake it."""
        self.inbox.put(call)
        if self.wake:  # else Windows: _drain() looks every 100 ms
            try:
                os.write(self.wake[1], b"!")
            except BlockingIOError:
                pass  # the pipe is full, so a wake-up is already waiting

    def _drain(self):
        """Runs on the main thread when the wake pipe is readable (on
        Windows, every 100 ms): read every byte waiting and empty the inbox,
        so a burst of events costs one wake-up and one pass here."""
        if self.wake:
            os.read(self.wake[0], 4096)
        else:
            self.root.after(100, self._drain)
        while not self.closed:  # a call before us may have closed it
            try:
                method, *args = self.inbox.get_nowait()
            except queue.Empty:
                return
            method(*args)

    # -- showing what happens --
    def _show_event(self, event, notices):
        for message in event.messages:
            self._show_message(message)
        if event.HasField("welcome"):
            self.away = False
            if self.joined:
                self._notice("reconnected")
            self.joined = True
        for notice in notices:
            self._notice(notice)
        if event.presence or event.HasField("welcome"):
            self._draw_members()

    def _show_message(self, message, read=False):
        """Where bob sees alice's "hi": format_message's chunks; greyed if
        already read (the polish shows those, above the new ones)."""
        in_sight = self._put(self._chunks(message, read))
        trace_view("message", f"{message.sender_name}: {message.text}",
                   "read" if read else "new")
        if not read and message.sender_id != self.chat.client_id:
            self._arrived(message, in_sight)  # own: a new process's replay

    def _chunks(self, message, read=False):
        """format_message's (text, kind) chunks (section 8), each with its
        kind's tag; the name's is name_tag(message); "read" if read."""
        tags = {"name": self.name_tag(message)}
        if read:  # all but the time greyed
            tags = {"name": "read", "text": "read"}
        return [(text, tags.get(kind, kind))
                for text, kind in format_message(message)]

    def name_tag(self, message):
        return "name"

    def _arrived(self, message, in_sight):
        """A new message from someone else is in the view, in sight or (the
        user is scrolled up, reading) not."""

    def _notice(self, text):
        self._put([(text, "notice")])
        trace_view("notice", text)

    def _show_state(self, state, text, away_since=None):
        """The connection's state (on_status); away_since: since when the
        server is away."""
        if state == "online":
            self._show_status(f"Connected as {self.name} to {self.target}")
        elif state == "reconnecting":
            self.away = True  # nobody is known to be online until a Welcome
            self._draw_members()
            self._show_status(f"Reconnecting: {text}")
        elif state == "closed" and not self.closed:
            # The server said no for good: explain, then close the window.
            sentence = text if self.joined else self.args.explain.join(
                self.chat.refusal, self.target, self.args.tls)
            self._show_status(sentence[0].upper() + sentence[1:], True)
            self.exit_status = 1
            self._dialog(messagebox.showerror, "chat.py", sentence)
            self.close(ask=False)

    def _show_status(self, text, problem=False):
        """The status line. What is not a problem is the connection's
        state, which send_typed shows again after a "Not sent"."""
        if not problem:
            self.connection = text
        self.status.configure(text=text, foreground=self.COLORS[
            "failed" if problem else "notice"])
        trace_view("status", text)

    def _draw_members(self):
        """The member list, from ChatClient's roster (dict() copies it in
        one step): online ones first, then by name; while the server is
        away, nobody knows who is online."""
        roster = dict(self.chat.roster)  # member id -> (name, online)

        def order(entry):  # online first (all, while away), then by name
            _client_id, (name, online) = entry
            return not (online or self.away), name.lower()
        self.members.delete(0, "end")
        for client_id, (name, online) in sorted(roster.items(), key=order):
            state = "away" if self.away else "online" if online else "offline"
            you = " (you)" if client_id == self.chat.client_id else ""
            mark = {"online": "●", "offline": "○", "away": "◌"}[state]
            self.members.insert("end", f"{mark} {name}{you}")
            self.members.itemconfigure("end", foreground=self.COLORS.get(
                state, ""))
        trace_view("members", ", ".join(self.members.get(0, "end")))

    def _put(self, chunks, tag=None):
        """Add an entry of (text, tag) chunks at the view's end, or in place
        of the one tagged `tag`. The view follows the end if it was there
        (the user was not scrolled up, reading); returns whether it was."""
        at_bottom, view = self.view.yview()[1] >= 0.999, self.view
        view.configure(state="normal")
        if tag and view.tag_ranges(tag):  # in place of the old one
            start = view.index(f"{tag}.first")
            view.delete(start, f"{tag}.last")
        else:  # on a line of its own, at the end
            if view.index("end-1c") != "1.0":
                view.insert("end", "\n")
            start = view.index("end-1c")
        view.mark_set("at", start)  # a mark moves on past text put at it
        for text, tags in chunks:
            view.insert("at", text, tags)
        # Each line after an entry's first is indented: "line" does it
        # where text wraps, "more" after a newline.
        view.tag_add("line", start, "at")
        view.tag_add("more", f"{start} lineend +1c", "at")
        if tag:
            view.tag_add(tag, start, "at")
        view.configure(state="disabled")
        if at_bottom:
            view.see("end")
        return at_bottom

    # -- leaving --
    def close(self, ask=True):
        """Close the window: its close button, Ctrl+Q or /quit (ask), or
        Ctrl-C in the terminal (not ask); run() does the rest."""
        if not self.closed:
            self.closed = True
            if self.wake:
                self.root.tk.deletefilehandler(self.wake[0])
            self.root.destroy()  # and mainloop returns

    def _dialog(self, dialog, *args, **options):
        """A modal dialog's answer, or None if Ctrl-C closed the window
        meanwhile: a dialog waits in an event loop of its own, which runs
        our <<Quit>> binding too."""
        try:
            return dialog(*args, parent=self.root, **options)
        except tk.TclError:
            if not self.closed:
                raise
            return None


def open_window(args):
    """client's window (Part I's no_window tells what it returns)."""
    root, why_not = open_root()
    if root is None:
        return None, why_not
    return args.window_class(root, args).run(), None


def window_flags(commands):
    """Part II on the command line: client opens a window."""
    commands.choices["client"].set_defaults(window=open_window,
                                            window_class=ChatWindow)


EXTENSIONS.append(window_flags)


# The window's polish --------------------------------------------------------
#
# Each mixin adds one thing to ChatWindow, overriding the hooks that its
# docstring names and calling the lesson's through super(), as socketserver's
# ThreadingMixIn adds threads to its TCPServer. PolishedWindow combines them
# by name: leave one out of its bases, and the window goes without it.

class ColoursMixIn:
    """A palette; every sender's name in a colour of its own, the same in
    every window (ids 1 to 7 all differ), and yours in blue; the members
    in green and grey. Overrides COLORS, _build, name_tag."""

    COLORS = {"own": "#1c71d8", "time": "#9a9996", "read": "#9a9996",
              "sending": "#9a9996", "divider": "#e01b24",
              "notice": "#77767b", "failed": "#e01b24", "online": "#26a269",
              "offline": "#9a9996", "away": "#c0bfbc"}
    SENDERS = ("#26a269", "#c64600", "#813d9c", "#0e7c86", "#865e3c",
               "#b5348a", "#5e5c64")  # for names other than yours

    def _build(self):
        super()._build()
        for tag, color in [("own", self.COLORS["own"]), *(
                (f"sender{index}", color)
                for index, color in enumerate(self.SENDERS))]:
            self.view.tag_configure(tag, foreground=color, font=self.bold)

    def name_tag(self, message):
        if message.sender_id == self.chat.client_id:
            return "own"
        return f"sender{sum(message.sender_id.encode()) % len(self.SENDERS)}"


class UnreadMixIn:
    """On joining, up to 20 already-read messages, greyed, then a line "2
    new messages" above the unread ones, scrolled to the top of the view
    once they are all in (CaughtUp). Overrides HISTORY, _show_event."""

    HISTORY = 20

    def _show_event(self, event, notices):
        first = event.HasField("welcome") and not self.joined
        super()._show_event(event, notices)
        if first:
            self.view.tag_configure("read", foreground=self.COLORS["read"])
            for message in event.welcome.recent:
                self._show_message(message, read=True)
        if first and event.welcome.unread:
            rule = "\u2500" * 4
            self.view.tag_configure("divider", justify="center",
                                    foreground=self.COLORS["divider"])
            news = plural(event.welcome.unread, "new message")
            self._put([(f"{rule}  {news}  {rule}", "divider")])
            # A mark is a place in the text that moves as text is added
            # before it. Left gravity: what is added at the mark goes after
            # it, so the mark stays on the divider.
            self.view.mark_set("divider", "end-1l linestart")
            self.view.mark_gravity("divider", "left")
            trace_view("divider", event.welcome.unread)
        elif (event.HasField("caught_up")
              and "divider" in self.view.mark_names()):
            self.view.yview("divider")  # the first unread at the top
            self.view.mark_unset("divider")
            trace_view("scrolled to divider")


class JumpMixIn:
    """While the user is scrolled up, reading, a button over the view's
    bottom says what came below ("↓ 2 new messages") and goes there.
    Overrides _build, _arrived."""

    below = 0  # new messages below the view's bottom

    def _build(self):
        super()._build()
        self.jump = ttk.Button(self.view.master, command=self._jump,
                               takefocus=False)
        self.view.configure(yscrollcommand=self._scrolled)

    def _arrived(self, message, in_sight):
        super()._arrived(message, in_sight)
        if not in_sight:
            self.below += 1
            self.jump.configure(
                text=f"\u2193 {plural(self.below, 'new message')}")
            self.jump.place(in_=self.view, relx=0.5, rely=1.0, y=-8,
                            anchor="s")

    def _jump(self):
        self.view.see("end")
        self.entry.focus_set()

    def _scrolled(self, first, last):
        """The view moved (yscrollcommand): move the scrollbar, and once
        the bottom is in sight, hide the button."""
        self.scroll.set(first, last)
        if self.below and float(last) >= 0.999:
            self.below = 0
            self.jump.place_forget()


class UnseenCountMixIn:
    """The title counts the messages that came while the window was not
    focused: "(2) alice - chat at HOST:PORT". Overrides _build, _arrived,
    _set_title."""

    unseen = 0

    def _build(self):
        super()._build()
        for event in ("<FocusIn>", "<FocusOut>"):
            self.root.bind(event, lambda _event: self._set_title())

    def _arrived(self, message, in_sight):
        super()._arrived(message, in_sight)
        if not self.focused():
            self.unseen += 1
            self._set_title()

    def _set_title(self, count=""):
        if self.focused():
            self.unseen = 0
        super()._set_title(f"({self.unseen}) " if self.unseen else count)

    def focused(self):
        # Tk's own name for the focus widget: it may be one that Python did
        # not create (a dialog's button), which focus_get() cannot look up.
        return str(self.root.tk.call("focus")) != ""


class AwayClockMixIn:
    """While the server is away, the status line says for how long, again
    at each whole second: "Reconnecting: the server is shutting down. Away
    for 15 s." A Tk timer, which runs only while we are away. Overrides
    _show_state."""

    clock = None  # the timer

    def _show_state(self, state, text, away_since=None):
        if self.clock is not None:
            self.root.after_cancel(self.clock)
            self.clock = None
        super()._show_state(state, text, away_since)
        if state == "reconnecting":
            self._tick(text.rstrip("."), away_since)

    def _tick(self, reason, away_since):
        away = time.monotonic() - away_since
        self._show_status(f"Reconnecting: {reason}. "
                          f"Away for {duration(away)}.")
        self.clock = self.root.after(1000 - int(away % 1 * 1000), self._tick,
                                     reason, away_since)


class AskFirstMixIn:
    """Closing with messages not yet stored asks first: "2 messages not
    sent yet. Close anyway and lose them?" No, the safe answer, is the
    default: Enter keeps the window open. Ctrl-C does not ask. Overrides
    close."""

    asking = False  # the dialog is open: the close button must not ask again

    def close(self, ask=True):
        if ask and self.pending and not self.closed and (
                self.asking or not self._lose_unsent()):
            return  # kept open, or Ctrl-C closed it meanwhile
        super().close(ask)

    def _lose_unsent(self):
        them = "it" if self.pending == 1 else "them"
        question = (f"{plural(self.pending, 'message')} not sent yet. Close "
                    f"anyway and lose {them}?")
        trace_view("close dialog", question)
        self.asking = True
        try:
            lose = self._dialog(messagebox.askyesno, "chat.py", question,
                                icon="warning", default="no")
        finally:
            self.asking = False
        if lose is False:  # not None: Ctrl-C did not close the window
            trace_view("kept open")
        return lose


class SignInMixIn:
    """Before the window, one ListMembers call (of a second at most) asks
    for the room password if the room wants one and CHAT_PASSWORD did not
    give it (again while it is wrong), and finds the name the server
    remembers for our id, for the name dialog. Without an answer, joining
    will say what is wrong. Overrides sign_in."""

    def sign_in(self):
        password, name = super().sign_in()
        while True:
            chat = ChatClient(self.target, self.args.client_id, "", None,
                              None, password=password,
                              tls=self.args.tls)  # no Join
            try:
                return password, next((m.name for m in chat.list_members(
                    timeout=1) if m.id == self.args.client_id), name)
            except Refused as refused:
                if refused.code != grpc.StatusCode.UNAUTHENTICATED:
                    return password, name
            finally:
                chat.close()
            wrong = "Wrong password. " if password else ""
            trace_view("password dialog" + (" again" if wrong else ""))
            password = self._dialog(
                simpledialog.askstring, "chat.py",
                f"{wrong}This room needs a password:", show="*")
            if not password:  # cancelled: Escape, Cancel, Ctrl-C...
                return None


class SelectAllMixIn:
    """Ctrl+A selects all the text in a field, as elsewhere on a desktop
    (Tk's own goes to the start of the line, as in Emacs). Overrides run."""

    def run(self):
        for widget_class in ("Entry", "Text"):  # the name, the message box
            self.root.bind_class(widget_class, "<Control-a>", self.select_all)
        return super().run()

    def select_all(self, event):
        event.widget.event_generate("<<SelectAll>>")
        return "break"  # and not Tk's


class PlaceMixIn:
    """--geometry: the window's size and place; and a set size, so that a
    long status wraps onto more lines, taking them from the view, instead
    of widening the window. Overrides _build."""

    def _build(self):
        super()._build()
        self.status.configure(width=1)  # wraps at the width the window gives
        self.status.bind("<Configure>", lambda event: self.status.configure(
            wraplength=event.width))
        self.root.update_idletasks()
        self.root.geometry(f"{self.root.winfo_reqwidth()}x"
                           f"{self.root.winfo_reqheight()}")
        if self.args.geometry:
            self.root.geometry(self.args.geometry)


class PolishedWindow(ColoursMixIn, UnreadMixIn, JumpMixIn, UnseenCountMixIn,
                     AwayClockMixIn, AskFirstMixIn, SignInMixIn,
                     SelectAllMixIn, PlaceMixIn, ChatWindow):
    """The window that the full program opens."""


def geometry(text):
    """client --geometry: Tk's WxH+X+Y (or WxH, or +X+Y), in pixels."""
    if not re.fullmatch(r"\d+x\d+([+-]-?\d+[+-]-?\d+)?|[+-]-?\d+[+-]-?\d+",
                        text):
        raise argparse.ArgumentTypeError(
            f"give WxH+X+Y in pixels, e.g. 420x520+0+0, not {text!r}")
    return text


def polish_flags(commands):
    """The polished window, and --geometry."""
    client = commands.choices["client"]
    client.add_argument("--geometry", metavar="WxH+X+Y", type=geometry,
                        help="size and place of the window, e.g. 420x520+0+0")
    client.set_defaults(window_class=PolishedWindow)


EXTENSIONS.append(polish_flags)


# Part III: for a thousand members ===========================================
#
# Each optimization is a small subclass (or mixin) of a Part I class that
# says what it buys and what it costs; the figures are in README's
# Performance. `server --plain` and `client --plain` leave them out, all but
# SerializedOnce. They spare the event loop's thread, which runs every
# handler step and every write's sendmsg() (section 6): with 1,000 members
# online, it is the bottleneck.


# 11. Serving a thousand members ---------------------------------------------


class CoalescingSession(Session):
    """Each write carries every event waiting in the queue (up to
    MAX_BATCH), as a write costs about as much for ten messages as for one.
    Buys, with RoundsHub, a busy room's throughput; costs nothing a member
    can see."""

    MAX_BATCH = 100  # events per write, at most (a message: up to 16 KB)
    held = None  # an event taken from the queue, to write next

    async def next_write(self):
        """The next event (waits for one), joined with the events of the
        same kind queued right behind it. Serialized Events that hold only
        `messages` (or only `presence`), joined, are one Event with all
        their elements (chat.proto says why). The first byte tells the kind:
        the field's key, (field number << 3) | wire type 2, is 0x12 for
        `messages` (field 2), 0x22 for `presence` (field 4)."""
        first = self.held or await self.queue.get()
        self.held = None
        parts = [first]
        while not self.queue.empty() and len(parts) < self.MAX_BATCH:
            event = self.queue.get_nowait()
            if event[:1] != first[:1]:
                self.held = event  # goes out next time
                break
            parts.append(event)
        data = b"".join(parts)
        trace("server", "CoalescingSession.next_write", data)
        return data


class RoundsHub(Hub):
    """Fan-out in rounds, so that CoalescingSession finds several messages
    for each write. A round puts everything published since the last one
    into the queues, and the loop runs each woken writer's step. If that
    took more than BUSY_SHARE of the time since the last round began, then
    for BUSY_FOR seconds each round is followed by a rest as long as it
    took: what is published meanwhile goes out in the next round, one write
    per member, and the rest lets waiting Sends in. A quiet room never
    rests. Buys, with CoalescingSession, a busy room's throughput; costs a
    message published during a rest that wait."""

    BUSY_SHARE = 0.3  # of the loop's time spent starting one round's writes
    REST = 1.0        # while busy, rest this many times as long as the round
    BUSY_FOR = 1.0    # seconds that a busy round counts

    def __init__(self, too_slow):
        super().__init__(too_slow)
        self.published = 0    # events published so far; numbers them
        self.last_added = 0   # first_event of the last session added
        self.waiting = []     # (number, data, skip, only) for the next round
        self.next_round = None    # set from publish() to the round's end
        self.last_round = -math.inf  # loop time when the last round began
        self.rest_until = 0.0     # loop time before which no round starts
        self.busy_until = 0.0     # loop time until which rounds rest

    def add(self, session):
        # A member that comes online while events wait for a round has them
        # already (a message in its replay, a presence change in its
        # Welcome), so it gets only those published from now on.
        session.first_event = self.last_added = self.published + 1
        return super().add(session)

    def publish(self, data, skip=(), only=None):
        """Queue data in the next round; rounds keep the order of publish."""
        trace("server", "RoundsHub.publish", data)
        self.published += 1
        self.waiting.append((self.published, data, skip, only))
        if self.next_round is None:
            self._schedule_round(asyncio.get_running_loop())

    def _schedule_round(self, loop):
        # A time in the past means the next pass of the loop.
        self.next_round = loop.call_at(self.rest_until, self._round)

    def _round(self):
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting, self.waiting = self.waiting, []
        try:
            for number, data, skip, only in waiting:
                sessions = self.recipients(skip, only)
                if number < self.last_added:  # someone came online since
                    sessions = [session for session in sessions
                                if number >= session.first_event]
                trace("server", "RoundsHub._round", data, to=len(sessions))
                self.deliver(data, sessions)
        finally:
            # put_nowait() woke the writers; the loop runs their steps (each
            # starts its write) before this callback, scheduled after them.
            # Until then next_round stays set: what comes meanwhile waits.
            loop.call_soon(self._rest, started)

    def _rest(self, started):
        loop = asyncio.get_running_loop()
        now = loop.time()
        took = now - started  # the round, and the writers' steps it woke
        if took > self.BUSY_SHARE * (now - self.last_round):
            self.busy_until = now + self.BUSY_FOR
        self.last_round = started
        if now < self.busy_until:
            self.rest_until = now + took * self.REST
        self.next_round = None
        if self.waiting:  # published during the round
            self._schedule_round(loop)


class BatchedReadsStore(Store):
    """Read positions saved together, in one commit within SAVE_DELAY,
    instead of a commit (and a page of the WAL file) for each MarkRead.
    Buys the loop's time in a busy room; costs, if the server is killed
    before it saves, those members their last second of messages shown
    again: twice, never lost."""

    SAVE_DELAY = 1.0  # seconds

    def __init__(self, path):
        super().__init__(path)
        self.unsaved = {}   # member id -> read_seq, not committed yet
        self.timer = None   # will call save_reads()

    def read_seq(self, client_id):
        if client_id in self.unsaved:
            return self.unsaved[client_id]
        return super().read_seq(client_id)

    def save_read(self, client_id, position):
        self.unsaved[client_id] = position
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                self.SAVE_DELAY, self.save_reads)

    def save_reads(self):
        """Commit the positions kept in memory, in one transaction."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.unsaved:
            return
        reads, self.unsaved = self.unsaved, {}
        # No fsync (synchronous=NORMAL): a power cut would only show some
        # messages again, and the next message's fsync covers these too.
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("BEGIN")
        self.db.executemany(
            "UPDATE members SET read_seq = ? WHERE id = ?",
            [(seq, client_id) for client_id, seq in reads.items()])
        self.db.execute("COMMIT")
        self.db.execute("PRAGMA synchronous = FULL")

    def close(self):
        self.save_reads()
        super().close()


class BatchedPresence:
    """A mixin for ChatRoomServicer, with SerializedOnce: presence changes
    go out together, as one Event, PRESENCE_DELAY after the first, or later
    in a big room: a batch costs a write per member online, so batches come
    at most PRESENCE_WRITES / (members online) times a second. A Welcome
    lists the members as the last batch showed them, serialized once for
    every Welcome until the next batch, with the joining member's own entry
    as it is now; the changes since come to it in the next batch. (A chat
    message sends the changes waiting first, so the order stays true.)
    Buys a join storm in which each join costs about the same, whatever the
    size of the room; costs "bob joined" a little late."""

    PRESENCE_DELAY = 0.1    # seconds, at least
    PRESENCE_WRITES = 5000  # a second, at most

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.presence = []          # pb.Members not yet announced
        self.presence_joiners = []  # sessions that came online meanwhile
        self.presence_timer = None
        # What the last batch showed: member id -> its Welcome.members entry
        # (serialized); at the start, everyone offline. And those entries
        # joined, with where each one is, once a Welcome needs them.
        self.shown = {member.id: member_entry(member)
                      for member in self._members()}
        self.shown_joined = None

    def _announce(self, session, online):
        self.presence.append(pb.Member(id=session.client_id,
                                       name=session.name, online=online))
        if self.presence_timer is None:
            delay = max(self.PRESENCE_DELAY,
                        len(self.hub.online) / self.PRESENCE_WRITES)
            self.presence_timer = asyncio.get_running_loop().call_later(
                delay, self._send_presence)

    def _go_online(self, request, name):
        session, welcome, replay = super()._go_online(request, name)
        self.presence_joiners.append(session)
        return session, welcome, replay

    def _welcome_members(self, client_id):
        """Only the member's own entry, as it is now; wire adds the others'."""
        return [pb.Member(id=client_id, name=self.store.names[client_id],
                          online=True)]

    def wire(self, event):
        if not event.HasField("welcome"):
            return super().wire(event)
        # An Event with only a Welcome is b"\x0a" (field 1, wire type 2), the
        # Welcome's length and its bytes. The members' entries go after the
        # Welcome's other fields: protobuf takes the fields of a message in
        # any order, and the elements of a repeated one in order.
        if self.shown_joined is None:
            spans, at = {}, 0
            for member_id, entry in self.shown.items():
                spans[member_id] = (at, at + len(entry))
                at += len(entry)
            self.shown_joined = b"".join(self.shown.values()), spans
        others, spans = self.shown_joined
        own = event.welcome.members.pop()  # in its place among the others
        start, end = spans.get(own.id, (len(others), len(others)))
        welcome = (event.welcome.SerializeToString() + others[:start]
                   + member_entry(own) + others[end:])
        return b"\x0a" + varint(len(welcome)) + welcome

    def _fan_out(self, stored):
        self._send_presence()
        super()._fan_out(stored)

    def _send_presence(self):
        """Publish the presence changes that wait, once for everyone who
        was online before they began; a member that came online meanwhile
        gets them all but its own, as its Welcome showed the last batch."""
        if self.presence_timer is not None:
            self.presence_timer.cancel()
            self.presence_timer = None
        if not self.presence:
            return
        changes, self.presence = self.presence, []
        joiners, self.presence_joiners = self.presence_joiners, []
        # One Event per change, joined (CoalescingSession.next_write): any
        # of them joined are one Event too, so a joiner's copy is a join.
        parts = [pb.Event(presence=[member]).SerializeToString()
                 for member in changes]
        self.hub.publish(b"".join(parts),
                         skip={session.client_id for session in joiners})
        for session in joiners:
            if tail := b"".join(part for member, part in zip(changes, parts)
                                if member.id != session.client_id):
                self.hub.publish(tail, only=session)
        for member in changes:
            self.shown[member.id] = member_entry(member)
        self.shown_joined = None


def member_entry(member):
    """A pb.Member as an element of Welcome.members, serialized: the bytes
    of a Welcome with only that member (its key, its length, its bytes)."""
    return pb.Welcome(members=[member]).SerializeToString()


def varint(number):
    """A length as protobuf writes it before a field's bytes: 7 bits a
    byte, low bits first, the high bit set on every byte but the last."""
    data = bytearray()
    while number > 0x7F:
        data.append(number & 0x7F | 0x80)
        number >>= 7
    data.append(number)
    return bytes(data)


def chat_room_handlers(servicer):
    """Our RPCs as gRPC method handlers, by name: what the generated
    add_ChatRoomServicer_to_server() registers, by hand for two changes.
    Join has no response serializer: gRPC sends the bytes that
    SerializedOnce.wire made. And no request deserializers (hardening):
    for bytes that do not parse (a string that is not UTF-8, say), gRPC's
    would log a traceback and answer UNKNOWN; parsed_as answers
    INVALID_ARGUMENT, with a sentence."""
    return {
        "Join": grpc.unary_stream_rpc_method_handler(
            parsed_as(pb.JoinRequest, servicer.Join)),
        "Send": grpc.unary_unary_rpc_method_handler(
            parsed_as(pb.SendRequest, servicer.Send),
            response_serializer=pb.SendReply.SerializeToString),
        "MarkRead": grpc.unary_unary_rpc_method_handler(
            parsed_as(pb.MarkReadRequest, servicer.MarkRead),
            response_serializer=pb.MarkReadReply.SerializeToString),
        "ListMembers": grpc.unary_unary_rpc_method_handler(
            parsed_as(pb.ListMembersRequest, servicer.ListMembers),
            response_serializer=pb.ListMembersReply.SerializeToString),
    }


def parsed_as(request_class, method):
    """Wrap an RPC method so that it receives raw bytes, parses them as
    request_class, and refuses bytes that do not parse. (alice's Send of
    "hi" arrives here as bytes, and reaches ChatRoomServicer.Send parsed.)"""
    async def handler(raw, context):
        try:
            request = request_class.FromString(raw)
        except DecodeError as error:
            log.info("refused %s: not a valid %s (%s)", context.peer(),
                     request_class.DESCRIPTOR.name, error)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request_class.DESCRIPTOR.name}"
                f" ({str(error).rsplit(': ', 1)[-1]}).")
        return await method(request, context)
    return handler


class SerializedOnce:
    """A mixin for ChatRoomServicer: each event serialized once, not once
    per member. Buys the loop's time, and the byte-joining that
    CoalescingSession does; costs hand-written method handlers, which also
    refuse requests that do not parse (parsed_as)."""

    def wire(self, event):
        trace("server", "SerializedOnce.wire", event)
        return event.SerializeToString()

    def add_to(self, server):
        # Registered methods, as the generated code also adds them: grpc.aio
        # keeps a new-call request pending for each (and one for all
        # generic ones), so a Send does not queue behind MarkReads to get in.
        server.add_registered_method_handlers("chat.ChatRoom",
                                              chat_room_handlers(self))


class PlainServicer(SerializedOnce, ChatRoomServicer):
    """`server --plain`: Part I's servicer, store, hub and sessions, with
    SerializedOnce, so that a request that does not parse gets
    INVALID_ARGUMENT there as well."""


class ThousandMemberServicer(BatchedPresence, SerializedOnce,
                             ChatRoomServicer):
    """Part I's servicer with all of Part III: what `server` runs. It also
    runs Python's cyclic garbage collector less often: each write makes
    objects it tracks, and with many streams a collection comes often and
    walks them all to find nothing (reference counting frees them). Buys a
    lower p99; costs memory that cycles hold a little longer.

    And core queues more new calls for it: past max_pending_requests calls
    that the loop has not taken yet, core cancels new ones at random, and
    all past the hard limit (1,000 and 3,000 by default, server.cc). A
    restart brings every member back at once, and a CANCELLED Join is
    tried again, which only adds to the queue. Buys every Join of a
    3,000-member storm answered on its first try; costs the memory of
    calls waiting (a call left waiting 30 s is cancelled all the same)."""

    store_class = BatchedReadsStore
    hub_class = RoundsHub
    session_class = CoalescingSession
    server_options = [("grpc.server.max_pending_requests", 10_000),
                      ("grpc.server.max_pending_requests_hard_limit", 20_000)]
    GC_THRESHOLD = 20_000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gc.set_threshold(self.GC_THRESHOLD, 10, 10)


# 12. Read receipts for a thousand members -----------------------------------


class ThrottledReadReceipts(ReadReceipts):
    """ReadReceipts that confirm about every INTERVAL seconds, not after
    each batch of messages, however busy the room. Buys the server's time;
    costs, if the client dies, its last seconds of messages shown again as
    unread (none is lost)."""

    INTERVAL = 5.0  # seconds between MarkReads, on average

    @classmethod
    def pause(cls):
        """INTERVAL, give or take half: every client gets a message at the
        same moment, and random pauses spread their MarkReads."""
        return cls.INTERVAL * (0.5 + random.random())

    def __init__(self, stub, client_id, metadata):
        super().__init__(stub, client_id, metadata)
        self._timer = None     # plans the next MarkRead
        self._leaving = False  # flush() was called: confirm at once

    def _start(self):
        """Instead of a MarkRead now, plan one for after a pause (unless
        one is planned already, or we are leaving). Hold the lock."""
        if self._leaving:
            return super()._start()
        if self._timer is None and self._received > self._confirmed:
            self._timer = threading.Timer(self.pause(), self._due)
            self._timer.daemon = True
            self._timer.start()
        return None

    def _due(self):
        """Runs on the timer's thread when the pause is over."""
        with self._changed:
            self._timer = None
            call = super()._start()
        self._watch(call)

    def flush(self, timeout):
        with self._changed:
            self._leaving = True
            if self._timer is not None:
                self._timer.cancel()
        super().flush(timeout)


def thousand_member_flags(commands):
    """Part III on the command line: used unless --plain."""
    server, client = commands.choices["server"], commands.choices["client"]
    server.add_argument("--plain", dest="servicer_class",
                        action="store_const", const=PlainServicer,
                        default=ThousandMemberServicer,
                        help="run Part I's classes (parsing requests as "
                        "SerializedOnce does), without the optimizations for "
                        "a thousand members")
    client.add_argument("--plain", dest="receipts", action="store_const",
                        const=ReadReceipts, default=ThrottledReadReceipts,
                        help="Part I only: confirm each batch of messages "
                        "at once, not every ~5 s")


EXTENSIONS.append(thousand_member_flags)


# Appendix: diagnoses and the demo ===========================================
#
# Two conveniences that are not the lesson: the sentences that find the
# cause of a start-up or connection mistake, and the demo. Both join the
# command line through Part I's one hook, EXTENSIONS.


# Diagnoses ------------------------------------------------------------------
#
# gRPC reports most mistakes in words of its own that do not say what to
# do ("Failed to bind to address"; "failed to connect to all addresses; last
# error: ... Socket closed"). Diagnose retraces each with a tool that says
# more (a plain socket, Python's ssl module, os.access) and names the flag
# to change.


class Diagnose(Explain):
    """Part I's Explain, with the cause found."""

    # How a first Join fails when the connection does, and what we tell the
    # user. gRPC's details end with the reason of its last connection
    # attempt, in its own words, which may change between versions ("failed
    # to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:50051:
    # Failed to connect to remote host: Connection refused"): the first clue
    # found wins.
    CONNECT_FAILURES = [
        ("Connection refused",
         "cannot reach the server at {target}: nothing listens on that port. "
         "Is `python chat.py server` running there?"),
        ("errors resolving",  # "... Domain name not found"
         "cannot reach the server at {target}: the name {host} does not "
         "resolve to an address; check its spelling."),
        ("WRONG_VERSION_NUMBER",  # our TLS hello got a plaintext answer
         "the server at {target} does not use TLS: leave out --tls-ca (or "
         "start the server with --tls-cert and --tls-key)."),
        ("Handshake read failed",  # hung up on our TLS hello
         "{target} hung up during the TLS handshake: is it the chat server, "
         "started with --tls-cert?"),
        ("Socket closed",  # hung up on our plaintext hello
         "the server at {target} hung up at once: if it uses TLS, give its "
         "certificate with --tls-ca."),
        ("Hostname Verification",
         "the server's certificate does not name {host}{names}: connect to a "
         "name it has, or make a certificate that names {host}."),
        ("CERTIFICATE_VERIFY_FAILED",
         "the server's certificate does not check out against {tls_ca}: it "
         "is neither that certificate nor signed by it, or it has expired."),
        ("Failed parsing HTTP/2",  # e.g. a web server answered
         "{target} is not a gRPC server: check the port."),
    ]

    def bind(self, host, port):
        """Found by trying the same bind with a plain socket, which reports
        the OS's errno."""
        if ":" in host and not host.startswith("["):
            return f"--host {host}: put an IPv6 address in brackets, [{host}]."
        try:
            addresses = socket.getaddrinfo(host.strip("[]"), port,
                                           type=socket.SOCK_STREAM)
        except socket.gaierror:
            return f"--host {host}: no such name or address."
        for family, kind, protocol, _, address in addresses:
            with socket.socket(family, kind, protocol) as probe:
                # Like gRPC's: a connection of the last server on this port
                # that is still closing (TIME_WAIT) does not count as in use.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(address)
                    continue
                except OSError as error:
                    reason = error
            if reason.errno == errno.EADDRINUSE:
                return (f"port {port} is already in use; stop what listens "
                        "there, or choose another --port.")
            if reason.errno == errno.EADDRNOTAVAIL:
                return (f"--host {host} is not an address of this machine; "
                        "0.0.0.0 means all of them.")
            return f"cannot listen on {host}:{port} ({reason.strerror})."
        return super().bind(host, port)

    def database(self, path, error):
        folder = os.path.dirname(os.path.abspath(path))
        if "locked" in str(error):
            return (f"--db {path} is in use by another chat server; stop it "
                    "first, or use another --db.")
        if os.path.isdir(path):
            return (f"--db {path} is a folder; name a file in it, e.g. "
                    f"{os.path.join(path, 'chat.db')}.")
        if not os.path.isdir(folder):
            return f"--db {path}: there is no folder {folder}."
        if "not a database" in str(error):
            return (f"--db {path} is not an SQLite database; name a new file "
                    "or one a chat server made.")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return f"--db {path} is read-only; the server must write to it."
        if not os.access(folder, os.W_OK):
            return (f"--db {path}: the folder {folder} is not writable "
                    "(SQLite keeps a journal file next to the database).")
        return super().database(path, error)

    def check_tls_files(self, flag, cert, key=None):
        """Given a bad file, gRPC says only "Failed to bind to address", or
        fails every connection; Python's ssl module says what is wrong."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cert)
        except ssl.SSLError:
            raise StartUpError(f"{flag} {cert} is not a PEM certificate.")
        except OSError as error:
            raise StartUpError(f"cannot read {flag} {cert} "
                               f"({error.strerror}).")
        if key is None:
            return
        try:
            context.load_cert_chain(cert, key, password=b"")  # never prompts
        except ssl.SSLError as error:
            if error.reason in ("KEY_VALUES_MISMATCH",
                                "NO_CERTIFICATE_ASSIGNED"):
                raise StartUpError(f"--tls-key {key} is not the private key "
                                   f"of --tls-cert {cert}.")
            raise StartUpError(f"--tls-key {key} is not a PEM private key "
                               "without a passphrase.")
        except OSError as error:
            raise StartUpError(f"cannot read --tls-key {key} "
                               f"({error.strerror}).")

    def certified_id(self, cert, key, ca):
        """Found by a TLS handshake with ourselves, in memory: our
        certificate, checked against ca as a server would check it, tells
        its name and whether it has expired. (A member's certificate need
        not be signed by the server's CA: then we cannot tell.)"""
        ours = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ours.load_cert_chain(cert, key, password=b"")  # check_tls_files ran
        checker = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        checker.check_hostname = False
        checker.load_verify_locations(ca)
        to_checker, to_ours = ssl.MemoryBIO(), ssl.MemoryBIO()
        ends = [checker.wrap_bio(to_checker, to_ours),
                ours.wrap_bio(to_ours, to_checker, server_side=True)]
        try:
            for _ in range(8):  # a handshake takes a few turns each
                for end in ends:
                    try:
                        end.do_handshake()
                    except ssl.SSLWantReadError:
                        pass  # waits for the other end's bytes
        except ssl.SSLCertVerificationError as error:
            if error.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
                raise StartUpError(f"--tls-cert {cert} has expired; ask for "
                                   "a new one.")
            return None
        except ssl.SSLError:
            return None
        subject = ends[0].getpeercert()["subject"]
        return next(value for part in subject for name, value in part
                    if name == "commonName")

    def join(self, refused, target, tls=None):
        """What happened, and what to do (stranger 9: "the server refused
        to let you join: id 9 is not a member of this group.")."""
        if refused.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # ChatClient's
            return (f"cannot reach the server at {target}: no answer within "
                    f"{CONNECT_TIMEOUT} s. Is the server stopped or busy, or "
                    "a firewall in the way?")
        if refused.code == grpc.StatusCode.UNIMPLEMENTED:  # no ChatRoom.Join
            return f"{target} is a gRPC server, but not a chat server."
        if refused.code != grpc.StatusCode.UNAVAILABLE:
            return super().join(refused, target, tls)
        if tls and "Socket closed" in refused.details:
            # The server hung up after the TLS handshake: it checks client
            # certificates (and says why only in its own log).
            if tls.cert is None:
                return ("the server wants a client certificate: give yours "
                        "with --tls-cert and --tls-key.")
            return (f"the server does not accept --tls-cert {tls.cert}: is "
                    "it signed by the CA that the server trusts (its "
                    "--tls-client-ca)?")
        tls_ca = tls and tls.ca
        host = target.rsplit(":", 1)[0]
        for clue, sentence in self.CONNECT_FAILURES:
            if clue in refused.details:
                names = ""
                if "{names}" in sentence and tls_ca:
                    names = ", ".join(self.certificate_names(target, tls_ca))
                    names = names and f" (it names {names})"
                return sentence.format(target=target, host=host,
                                       tls_ca=tls_ca, names=names)
        reason = re.sub(r".*last error: \w+: \S+: ", "", refused.details)
        return f"cannot reach the server at {target} ({reason})."

    @staticmethod
    def certificate_names(target, tls_ca):
        """The names in the certificate that the server at target presents,
        or [] if it cannot be read. The ssl module checks it against tls_ca,
        but not against the name, which is what we want to see."""
        host, port = target.rsplit(":", 1)
        context = ssl.create_default_context(cafile=tls_ca)
        context.check_hostname = False
        try:
            with (socket.create_connection((host.strip("[]"), int(port)),
                                           timeout=3) as connection,
                  context.wrap_socket(connection) as tls):
                certificate = tls.getpeercert()
        except (OSError, ValueError):
            return []
        names = [value for _kind, value
                 in certificate.get("subjectAltName", ())]
        # Without subjectAltName, gRPC checks the subject's commonName.
        return names or [value for part in certificate.get("subject", ())
                         for key, value in part if key == "commonName"]


def diagnoses(commands):
    """The Appendix on the command line: Diagnose for both commands."""
    for name in ("server", "client"):
        commands.choices[name].set_defaults(explain=Diagnose())


EXTENSIONS.append(diagnoses)


# The demo -------------------------------------------------------------------


class ServerProcess:
    """A chat server as a child process, once it listens: the demo's, and
    bench.py's (which also starts its baseline server with it)."""

    def __init__(self, command, stderr=subprocess.DEVNULL, script=__file__):
        self.popen = subprocess.Popen(
            [sys.executable, os.path.abspath(script), *command],
            stdout=subprocess.PIPE, stderr=stderr, text=True)
        line = self.popen.stdout.readline()  # "listening on HOST:PORT"
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{command[0]} did not start")
        self.address = line.split()[-1]

    def stop(self):
        self.popen.terminate()
        self.popen.wait()


def run_demo(args):
    """Start a server that keeps nothing (:memory:) and three windows;
    stop the server when the last window closes, or at Ctrl-C."""
    root, why_not = open_root()  # a test: can windows open here?
    if root is None:
        print(f"chat: the demo needs windows, but {why_not}", file=sys.stderr)
        return 1
    root.destroy()
    # Ctrl-C in the terminal reaches the server, the windows and us alike;
    # `kill` (SIGTERM) only us. Either way we raise KeyboardInterrupt, and
    # `finally` closes the windows (with SIGTERM, which they take as
    # Ctrl-C) and then stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server, windows, status = None, [], 0
    try:
        server = ServerProcess(["server", "--port", "0", "--db", ":memory:",
                                "--members", "1,2,3", "--log-level",
                                "WARNING"], stderr=None)
        print(f"demo: server at {server.address}, pid {server.popen.pid}",
              file=sys.stderr)
        open_demo_windows(server.address, windows)
        print("demo: close the three windows (or press Ctrl-C) to stop",
              file=sys.stderr)
        for window in windows:
            window.wait()
    except RuntimeError as error:
        print(f"chat: the demo {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("\ndemo: stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # we are on our way
        stop_demo(server, windows)
    print("demo: stopped", file=sys.stderr)
    return status


def open_demo_windows(address, windows):
    """A client window each for alice, bob and chad, side by side; each
    goes into `windows` as it starts, for stop_demo to find."""
    for index, name in enumerate(["alice", "bob", "chad"]):
        # stdin is not theirs: three clients must not share a terminal.
        windows.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "client",
             "--id", str(index + 1), "--name", name, "--server", address,
             "--geometry", f"400x520+{10 + 420 * index}+10"],  # 1280 px
            stdin=subprocess.DEVNULL))
        print(f"demo: window for {name}, pid {windows[-1].pid}",
              file=sys.stderr)


def stop_demo(server, windows):
    """Close the windows still open (SIGTERM), then stop the server."""
    for window in windows:
        window.terminate()  # Popen signals no process that has ended
    for window in windows:
        window.wait()
    if server:
        server.stop()


def demo_command(commands):
    demo = commands.add_parser(
        "demo", help="a throwaway server and windows for alice, bob, chad",
        description="Start a server that keeps nothing (--db :memory:, "
        "members 1, 2 and 3) and a window for each of alice, bob and chad. "
        "It stops when the last window closes.")
    demo.set_defaults(func=run_demo)


EXTENSIONS.append(demo_command)


if __name__ == "__main__":
    sys.exit(main())
