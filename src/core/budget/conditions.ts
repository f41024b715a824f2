/**
 * The planner's view of a DatabaseConnection as conditions (Ready,
 * Oversubscribed). Degraded (limit discovery, credentials) is the controller's.
 */
import type { ConditionUpdate } from '../conditions/index.ts';
import type { BudgetPlan, ConnectionSummary } from './types.ts';

/** Ready and Oversubscribed for one connection of a plan; pass them to setConditions. */
export function budgetConditions(plan: BudgetPlan, connection: ConnectionSummary): ConditionUpdate[] {
  const ready: ConditionUpdate = connection.podsWaiting === 0
    ? { type: 'Ready', status: 'True', reason: 'Allocated', message: `${connection.pods} pods at their budget; ${connection.allocated} of limit ${plan.limit} allocated on this connection` }
    : { type: 'Ready', status: 'False', reason: 'Rebalancing', message: `${connection.podsWaiting} of ${connection.pods} pods waiting for an acknowledgement or free capacity` };
  const oversubscribed: ConditionUpdate = plan.oversubscription
    ? { type: 'Oversubscribed', status: 'True', reason: 'MinimumsExceedLimit', message: plan.oversubscription.message }
    : { type: 'Oversubscribed', status: 'False', reason: 'WithinLimit', message: `minimums fit within limit ${plan.limit}` };
  return [ready, oversubscribed];
}
