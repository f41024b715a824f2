/**
 * LISTEN/NOTIFY in transaction mode: one server connection of the pool,
 * taken for as long as any client listens, LISTENs on the union of the
 * clients' channels, and every NotificationResponse it receives is handed to
 * the clients listening on that channel. The connection counts against the
 * grant like any other; the hub takes one only while the grant leaves at
 * least one more for transactions.
 *
 * PostgreSQL delivers a notification committed before a listener's next
 * statement ahead of that statement's ReadyForQuery. Through the hub it
 * arrives on another connection, so a listener's transaction starts only
 * after a round trip on the hub (`sync`): a backend sends the notifications
 * it was signalled about before its own ReadyForQuery.
 */
import { Duplex } from 'node:stream';
import type { Logger } from 'pino';
import { FrameReader, NO_SETTINGS, parseNoticeFields, readCString } from '../core/protocol/index.ts';
import type { AcquireFailure, Pool, PoolWaiter } from './pool.ts';
import type { ServerConnection } from './server-connection.ts';

/** A client that listens: where its notifications go. */
export interface NotificationListener {
  /** A NotificationResponse message (whole), for the client to send when it can. */
  deliver(message: Buffer): void;
}

const NOTIFICATION = 0x41;
const READY_FOR_QUERY = 0x5a;
const ERROR_RESPONSE = 0x45;

interface PendingCommand {
  sql: string;
  done: (error: string | undefined) => void;
}

/** An empty query: its ReadyForQuery comes after every notification the backend had been signalled about. */
const SYNC_SQL = '';

/** The sidecar's one listening server connection and who listens on what. */
export class NotificationHub implements PoolWaiter {
  readonly settings = NO_SETTINGS;
  readonly checkSettings = false;
  /** Where the server connection writes: read here, never sent on. */
  readonly socket: Duplex;
  private readonly pool: Pool;
  private readonly logger: Logger;
  private server: ServerConnection | undefined;
  private acquiring = false;
  /** Channel -> listeners. */
  private readonly channels = new Map<string, Set<NotificationListener>>();
  /** Channels LISTENed on the server connection. */
  private readonly listening = new Set<string>();
  private readonly queue: PendingCommand[] = [];
  private running: PendingCommand | undefined;
  private runningError: string | undefined;
  private reader = new FrameReader();
  /** The promise of the sync last queued, shared while it has not been sent. */
  private pendingSync: Promise<unknown> | undefined;
  /** UNLISTENs a listener sent to its server connection, applied here once the hub has sent what was notified before them (see unlistenLater). */
  private readonly laterUnlistens = new Map<NotificationListener, { channel: string; cancelled: boolean; keep: Set<string> }[]>();

  constructor(deps: { pool: Pool; logger: Logger }) {
    this.pool = deps.pool;
    this.logger = deps.logger;
    this.socket = new Duplex({
      read: () => undefined,
      write: (chunk: Buffer, _encoding, callback) => {
        this.onServerBytes(chunk);
        callback();
      },
    });
  }

  /** True if a listening connection can be had without leaving transactions none. */
  available(): boolean {
    return this.server !== undefined || this.pool.grant >= 2;
  }

  /** Channels with listeners (metrics, tests). */
  get channelCount(): number {
    return this.channels.size;
  }

  /** LISTEN `channel` for `listener`; resolves once the server listens (undefined) or with the server's error. */
  listen(listener: NotificationListener, channel: string): Promise<string | undefined> {
    // A LISTEN after an UNLISTEN still to be applied (see unlistenLater) wins, as it came later.
    for (const later of this.laterUnlistens.get(listener) ?? []) {
      if (later.channel === channel) later.cancelled = true;
      else later.keep.add(channel);
    }
    let listeners = this.channels.get(channel);
    if (listeners === undefined) this.channels.set(channel, (listeners = new Set()));
    listeners.add(listener);
    if (this.listening.has(channel)) return Promise.resolve(undefined);
    return this.command(`LISTEN ${quoteIdentifier(channel)}`).then((error) => {
      if (error === undefined) this.listening.add(channel);
      else {
        listeners.delete(listener);
        if (listeners.size === 0) this.channels.delete(channel);
      }
      return error;
    });
  }

  /** UNLISTEN `channel` (or every channel, '*', but those in `keep`) for `listener`. */
  unlisten(listener: NotificationListener, channel: string, keep?: ReadonlySet<string>): void {
    for (const [name, listeners] of this.channels) {
      if (channel !== '*' && name !== channel) continue;
      if (keep?.has(name) === true) continue;
      listeners.delete(listener);
      if (listeners.size === 0) this.channels.delete(name);
    }
    // The server keeps listening on channels nobody wants until the connection is given back.
    if (this.channels.size === 0 && this.server !== undefined && this.running === undefined && this.queue.length === 0) this.giveBack();
  }

  /**
   * An UNLISTEN of `channel` (or '*') that `listener` sent to its server
   * connection, not through the hub (pipelined behind its earlier statements,
   * inside a transaction block, beside other statements in one Query): its
   * server connection does not listen for it, so the hub ends that channel for
   * the listener too, once it has sent what was notified before (as
   * runListenCommand does for an UNLISTEN it answers). A LISTEN through the hub
   * meanwhile keeps its channel.
   */
  unlistenLater(listener: NotificationListener, channel: string): void {
    const later = { channel, cancelled: false, keep: new Set<string>() };
    const pending = this.laterUnlistens.get(listener) ?? [];
    pending.push(later);
    this.laterUnlistens.set(listener, pending);
    void this.sync().then(() => {
      pending.splice(pending.indexOf(later), 1);
      if (pending.length === 0 && this.laterUnlistens.get(listener) === pending) this.laterUnlistens.delete(listener);
      if (!later.cancelled) this.unlisten(listener, channel, later.keep);
    });
  }

  /**
   * The grant changed: below 2 the listening connection would leave
   * transactions none, so it is given back (listeners keep their channels and
   * miss what is sent until the grant allows it again).
   */
  grantChanged(grant: number): void {
    if (grant < 2 && this.server !== undefined && this.running === undefined) {
      this.logger.warn({ grant, channels: this.channels.size }, 'grant too small to keep a LISTEN connection; notifications are not received until it grows');
      this.giveBack();
    } else if (grant >= 2 && this.server === undefined && !this.acquiring && this.channels.size > 0) {
      this.acquiring = true;
      this.pool.acquire(this);
    }
  }

  /** True if `listener` listens on anything. */
  listens(listener: NotificationListener): boolean {
    for (const listeners of this.channels.values()) if (listeners.has(listener)) return true;
    return false;
  }

  /**
   * Resolves once the listening connection has sent every notification
   * committed before this call (at once if there is none). Callers waiting
   * together share one round trip.
   */
  sync(): Promise<unknown> {
    if (this.server === undefined) return Promise.resolve();
    const last = this.queue[this.queue.length - 1];
    if (last?.sql === SYNC_SQL && this.pendingSync !== undefined) return this.pendingSync;
    const sync = this.command(SYNC_SQL);
    this.pendingSync = sync;
    return sync;
  }

  private command(sql: string): Promise<string | undefined> {
    return new Promise((resolve) => {
      this.queue.push({ sql, done: resolve });
      this.pump();
    });
  }

  private pump(): void {
    if (this.running !== undefined || this.queue.length === 0) return;
    const server = this.server;
    if (server === undefined) {
      if (!this.acquiring) {
        this.acquiring = true;
        this.pool.acquire(this);
      }
      return;
    }
    this.running = this.queue.shift()!;
    this.runningError = undefined;
    server.tracker.clientMessage(0x51);
    const text = Buffer.from(`${this.running.sql}\0`);
    const header = Buffer.alloc(5);
    header[0] = 0x51;
    header.writeInt32BE(4 + text.length, 1);
    server.write(Buffer.concat([header, text]));
  }

  private onServerBytes(chunk: Buffer): void {
    const reader = this.reader;
    reader.push(chunk);
    while (reader.next()) {
      const { type, buffer, bodyStart, end } = reader;
      if (type === NOTIFICATION) this.fanOut(buffer, bodyStart, end, reader.start);
      else if (type === ERROR_RESPONSE) this.runningError = parseNoticeFields(buffer.subarray(bodyStart, end)).M ?? 'error';
      else if (type === READY_FOR_QUERY) {
        const done = this.running;
        this.running = undefined;
        done?.done(this.runningError);
        queueMicrotask(() => this.pump());
      }
    }
  }

  private fanOut(buffer: Buffer, bodyStart: number, end: number, start: number): void {
    const [channel] = readCString(buffer, bodyStart + 4, end);
    const listeners = this.channels.get(channel);
    if (listeners === undefined) return;
    const message = Buffer.from(buffer.subarray(start, end));
    for (const listener of listeners) listener.deliver(message);
  }

  private giveBack(): void {
    const server = this.server;
    if (server === undefined) return;
    this.server = undefined;
    this.listening.clear();
    this.reader = new FrameReader();
    this.endSyncs();
    // DISCARD ALL ends every LISTEN before another client gets the connection.
    this.pool.release(server, true, true);
  }

  /** Without a listening connection there is nothing to wait for: queued syncs end now. */
  private endSyncs(): void {
    const syncs = this.queue.filter((c) => c.sql === SYNC_SQL);
    if (syncs.length === 0) return;
    this.queue.splice(0, this.queue.length, ...this.queue.filter((c) => c.sql !== SYNC_SQL));
    this.pendingSync = undefined;
    for (const sync of syncs) sync.done(undefined);
  }

  // ---- PoolWaiter ---------------------------------------------------------

  /** The pool lent the hub its connection: LISTEN on every channel wanted. */
  onAcquired(server: ServerConnection): void {
    this.acquiring = false;
    this.server = server;
    for (const channel of this.channels.keys()) {
      if (this.listening.has(channel) || this.queue.some((c) => c.sql === `LISTEN ${quoteIdentifier(channel)}`)) continue;
      this.queue.unshift({ sql: `LISTEN ${quoteIdentifier(channel)}`, done: (error) => (error === undefined ? this.listening.add(channel) : undefined) });
    }
    this.pump();
  }

  /** No connection: the commands waiting fail with the pool's reason. */
  onAcquireFailed(failure: AcquireFailure): void {
    this.acquiring = false;
    for (const command of this.queue.splice(0)) command.done(failure.message);
  }

  /** The hub's connection never reaches a boundary it gives back at: it is kept. */
  onServerBoundary(): void {}

  /** Lost: listen again on a new connection (notifications sent meanwhile are lost, as direct). */
  onServerLost(_server: ServerConnection, reason: string, _afterFatal: boolean): void {
    this.logger.warn({ reason, channels: this.channels.size }, 'the LISTEN connection was lost; listening again on a new one');
    this.server = undefined;
    this.listening.clear();
    this.reader = new FrameReader();
    const running = this.running;
    this.running = undefined;
    running?.done(reason);
    this.endSyncs();
    if (this.channels.size > 0) {
      this.acquiring = true;
      this.pool.acquire(this);
    }
  }
}

function quoteIdentifier(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}
