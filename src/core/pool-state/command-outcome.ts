/**
 * Whether a command that ran inside a transaction will hold once that
 * transaction ends. PostgreSQL applies some commands at commit (UNLISTEN) or
 * undoes them on rollback (RESET, SET): the sidecar acts on them only when the
 * transaction is known to have committed.
 */

/**
 * 'clean': nothing since that could undo it (it holds at the next
 * ReadyForQuery 'I'); 'rolled-back': a ROLLBACK followed, undoing it unless
 * more commands come (then it was a ROLLBACK TO SAVEPOINT); 'doubtful': an
 * error, or a ROLLBACK TO SAVEPOINT and more: it may or may not hold.
 */
export type CommandOutcome = 'clean' | 'rolled-back' | 'doubtful';

/** What the server reported after the command: an ErrorResponse, a CommandComplete `ROLLBACK`, or another CommandComplete. */
export type OutcomeEvent = 'error' | 'rollback' | 'command';

/** The outcome after `event`; undefined (no such command in the transaction) stays undefined. */
export function outcomeAfter(outcome: CommandOutcome | undefined, event: OutcomeEvent): CommandOutcome | undefined {
  if (outcome === undefined) return undefined;
  switch (event) {
    case 'error':
      return 'doubtful';
    case 'rollback':
      return 'rolled-back';
    case 'command':
      return outcome === 'rolled-back' ? 'doubtful' : outcome;
  }
}
