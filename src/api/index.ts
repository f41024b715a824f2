/**
 * poolkeeper's API: the DatabaseConnection, DatabaseServer and PoolMember schemas, their
 * inferred types and the CRDs generated from them.
 */
export * from './group.ts';
export * from './common.ts';
export * from './databaseconnection.ts';
export * from './databaseserver.ts';
export * from './poolmember.ts';
export * from './poolgrant.ts';
export * from './crds.ts';
