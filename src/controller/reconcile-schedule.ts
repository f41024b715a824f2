/**
 * When a database server is reconciled. Every reconcile replans every pod of
 * the server (about 0.1-0.3 s of CPU at 10,000 pods), so events are not each
 * worth one, and what woke the controller decides how long it may wait:
 *
 * - A change of the server's inputs (a pod, a DatabaseConnection, a
 *   Secret...) after a quiet spell runs at once. Changes that follow within
 *   CHANGE_QUIET_MS are a burst (a scale-up's pods, a scale-down's
 *   deletions), reconciled once it has been quiet that long, or once it has
 *   lasted four plans (at least 200 ms).
 * - An acknowledgement (a sidecar answered, over the channel or in its
 *   status) or the controller's own write coming back through its cache:
 *   while the server's last plan waits for answers, only the last of them
 *   reconciles, at once, since what they freed can be granted now (unless a
 *   burst of changes is under way, whose end reconciles); the periodic pass of
 *   an unsettled server covers sidecars that never answer. With nothing
 *   awaited, at most one reconcile per spacing: 200 ms, or four plans.
 *
 * The queue de-duplicates and never runs one server twice at once; answers
 * heard while a reconcile runs are weighed when it ends (`finished`).
 */
import { steadyNow } from '../ops/clock.ts';

/** What the schedule hands reconciles to: the work queue. */
export interface ReconcileSink {
  add(server: string): void;
  addAfter(server: string, delayMs: number): void;
}

/** A timer that can be cancelled. */
export interface CancellableTimer {
  cancel(): void;
}

/** Clock and timers (tests pass their own). */
export interface ScheduleClock {
  now(): number;
  /**
   * Calls `fn` after `delayMs`, once the event loop has also read whatever
   * arrived meanwhile: a long plan blocks it, and events queued behind the
   * plan must not look like quiet.
   */
  after(delayMs: number, fn: () => void): CancellableTimer;
}

/** Least wait for a reconcile of a burst of changes, and between reconciles woken by acknowledgements. */
export const RECONCILE_SPACING_MS = 200;
/** Waits in multiples of the server's last plan time: the controller plans at most about a fifth of the time. */
export const RECONCILE_SPACING_PLANS = 4;
/** Most time a reconcile of a server waits while events keep coming. */
export const MAX_RECONCILE_SPACING_MS = 5_000;
/** A change that follows another within this time waits for the burst to go quiet this long. */
export const CHANGE_QUIET_MS = 250;

/** The event loop's own clock: setTimeout, then setImmediate (after pending I/O is read). */
export const systemClock: ScheduleClock = {
  now: steadyNow,
  after(delayMs, fn) {
    let immediate: NodeJS.Immediate | undefined;
    const timer = setTimeout(() => {
      immediate = setImmediate(fn);
    }, delayMs);
    timer.unref();
    return {
      cancel() {
        clearTimeout(timer);
        if (immediate) clearImmediate(immediate);
      },
    };
  },
};

/** Per server: what woke it and what its last plan waits for. */
interface ServerState {
  /** When its inputs last changed. */
  lastChange?: number;
  /** A burst of changes waiting for its reconcile: when it began, and the timer that checks for its end. */
  burst?: { since: number; timer: CancellableTimer };
  /** When its latest reconcile started. */
  started?: number;
  /** Pods (by UID) its last plan waits for that have not answered since. */
  awaited?: Set<string>;
  /** While it is reconciled: whether anything was heard, and from which pods. */
  heard?: { any: boolean; pods: Set<string> };
}

/** The reconcile schedule of every server. */
export class ReconcileSchedule {
  private readonly servers = new Map<string, ServerState>();
  private readonly sink: ReconcileSink;
  private readonly planMs: (server: string) => number | undefined;
  private readonly clock: ScheduleClock;

  /** `planMs`: how long the server's last plan took. */
  constructor(sink: ReconcileSink, planMs: (server: string) => number | undefined, clock: ScheduleClock = systemClock) {
    this.sink = sink;
    this.planMs = planMs;
    this.clock = clock;
  }

  private state(server: string): ServerState {
    let s = this.servers.get(server);
    if (!s) {
      s = {};
      this.servers.set(server, s);
    }
    return s;
  }

  /** Four plans, within [least, MAX_RECONCILE_SPACING_MS]. */
  private plans(server: string, least: number): number {
    return Math.min(MAX_RECONCILE_SPACING_MS, Math.max(least, RECONCILE_SPACING_PLANS * (this.planMs(server) ?? 0)));
  }

  /** The server's inputs changed. */
  changed(server: string): void {
    const s = this.state(server);
    const now = this.clock.now();
    const last = s.lastChange;
    s.lastChange = now;
    if (s.burst) return;
    if (last === undefined || now - last >= CHANGE_QUIET_MS) {
      this.sink.add(server);
      return;
    }
    s.burst = { since: now, timer: this.burstCheck(server, now, Math.min(CHANGE_QUIET_MS, this.plans(server, RECONCILE_SPACING_MS))) };
  }

  private burstCheck(server: string, since: number, delayMs: number): CancellableTimer {
    const timer = this.clock.after(delayMs, () => {
      const s = this.servers.get(server);
      if (s?.burst?.timer !== timer) return;
      const now = this.clock.now();
      const quietAt = (s.lastChange ?? 0) + CHANGE_QUIET_MS;
      const longestAt = since + this.plans(server, RECONCILE_SPACING_MS);
      if (now < quietAt && now < longestAt) {
        s.burst = { since, timer: this.burstCheck(server, since, Math.min(quietAt, longestAt) - now) };
        return;
      }
      s.burst = undefined;
      this.sink.add(server);
    });
    return timer;
  }

  /**
   * A sidecar answered (`podUid`), or something came back that the
   * controller itself wrote (no `podUid`).
   */
  answered(server: string, podUid?: string): void {
    const s = this.state(server);
    if (s.heard) {
      s.heard.any = true;
      if (podUid !== undefined) s.heard.pods.add(podUid);
      return;
    }
    if (s.awaited) {
      if (podUid !== undefined && s.awaited.delete(podUid) && s.awaited.size === 0) {
        s.awaited = undefined;
        if (!s.burst) this.sink.add(server);
      }
      return;
    }
    this.spaced(server, s);
  }

  private spaced(server: string, s: ServerState): void {
    const wait = (s.started ?? -Infinity) + this.plans(server, RECONCILE_SPACING_MS) - this.clock.now();
    if (wait > 0) this.sink.addAfter(server, wait);
    else this.sink.add(server);
  }

  /** A reconcile of the server starts. */
  started(server: string): void {
    const s = this.state(server);
    s.started = this.clock.now();
    s.awaited = undefined;
    s.heard = { any: false, pods: new Set() };
  }

  /**
   * A reconcile of the server ended; `awaited`: the pods its plan waits for
   * (undefined when it wrote no whole plan). Answers heard meanwhile count.
   */
  finished(server: string, awaited: ReadonlySet<string> | undefined): void {
    const s = this.state(server);
    const heard = s.heard ?? { any: false, pods: new Set<string>() };
    s.heard = undefined;
    if (awaited === undefined || awaited.size === 0) {
      if (heard.any) this.spaced(server, s);
      return;
    }
    const waiting = new Set([...awaited].filter((uid) => !heard.pods.has(uid)));
    if (waiting.size > 0) s.awaited = waiting;
    else if (!s.burst) this.sink.add(server);
  }

  /** Cancels every timer (the workers stop). */
  stop(): void {
    for (const s of this.servers.values()) s.burst?.timer.cancel();
    this.servers.clear();
  }
}
