/**
 * The life of one server connection as an explicit state machine. Every
 * state change in the sidecar goes through `transition()`, so an impossible
 * change (handing out a closing connection, reviving a closed one) is a bug
 * that throws at the point where it happens instead of leaking a dirty
 * connection to another client.
 */

/** States of a server connection. */
export type ServerConnectionState =
  /** TCP/TLS/SSH channel and login in progress. */
  | 'connecting'
  /** Logged in, clean, in the pool. */
  | 'idle'
  /** Lent to a client. */
  | 'active'
  /** Running the sidecar's own query: a pre-ping or DISCARD ALL. */
  | 'resetting'
  /** Terminate sent (or being sent); still counted against the grant until the socket closes. */
  | 'closing'
  /** Socket closed; no longer counted. */
  | 'closed';

/** The machine: the states each state may change to. */
export const SERVER_CONNECTION_TRANSITIONS: Readonly<Record<ServerConnectionState, readonly ServerConnectionState[]>> = {
  connecting: ['idle', 'active', 'closing', 'closed'],
  idle: ['active', 'resetting', 'closing', 'closed'],
  active: ['idle', 'resetting', 'closing', 'closed'],
  resetting: ['idle', 'active', 'closing', 'closed'],
  closing: ['closed'],
  closed: [],
};

/** Thrown for a state change the machine does not allow. */
export class InvalidTransitionError extends Error {
  readonly from: ServerConnectionState;
  readonly to: ServerConnectionState;

  constructor(from: ServerConnectionState, to: ServerConnectionState) {
    super(`server connection cannot go from ${from} to ${to}`);
    this.name = 'InvalidTransitionError';
    this.from = from;
    this.to = to;
  }
}

/** A state's bit in TRANSITION_MASKS (a switch: a lookup by a state name read from a variable is slow in V8). */
function stateBit(state: ServerConnectionState): number {
  switch (state) {
    case 'connecting':
      return 1;
    case 'idle':
      return 2;
    case 'active':
      return 4;
    case 'resetting':
      return 8;
    case 'closing':
      return 16;
    case 'closed':
      return 32;
  }
}

/** SERVER_CONNECTION_TRANSITIONS as bit masks: a change of state runs twice per transaction. */
const TRANSITION_MASKS: ReadonlyArray<number> = (() => {
  const masks: number[] = [];
  for (const from of Object.keys(SERVER_CONNECTION_TRANSITIONS) as ServerConnectionState[]) masks[stateBit(from)] = SERVER_CONNECTION_TRANSITIONS[from].reduce((mask, to) => mask | stateBit(to), 0);
  return masks;
})();

/** Returns `to` if the machine allows `from -> to`, otherwise throws InvalidTransitionError. */
export function transition(from: ServerConnectionState, to: ServerConnectionState): ServerConnectionState {
  if ((TRANSITION_MASKS[stateBit(from)]! & stateBit(to)) === 0) throw new InvalidTransitionError(from, to);
  return to;
}

/** States that hold a PostgreSQL backend and so count against the grant. */
export function holdsBackend(state: ServerConnectionState): boolean {
  return state !== 'closed';
}

/** Every state, for metrics that must report zeros too. */
export const SERVER_CONNECTION_STATES: readonly ServerConnectionState[] = ['connecting', 'idle', 'active', 'resetting', 'closing', 'closed'];
