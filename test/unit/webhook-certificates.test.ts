import assert from 'node:assert/strict';
import fc from 'fast-check';
import { createCertificateAuthority, issueCertificate } from '../../src/pki/certificates.ts';
import { bundleHolds, coversNames, issuedBy, mergeBundles, splitPemBundle } from '../../src/pki/bundle.ts';
import { DEFAULT_ROTATION_POLICY, planRotation, type RotationAction, type StoredCertificateState } from '../../src/pki/rotation.ts';

const DAY = 86_400_000;
const policy = DEFAULT_ROTATION_POLICY;
const at = (days: number): Date => new Date(Date.UTC(2030, 0, 1) + days * DAY);

/** A tiny model of the manager: applies each action the way src/webhook/certificates.ts does. */
function step(state: StoredCertificateState, action: RotationAction, now: Date): StoredCertificateState {
  const cert = (days: number): { notBefore: Date; notAfter: Date } => ({ notBefore: now, notAfter: new Date(now.getTime() + days * DAY) });
  const serving = (ca: { notAfter: Date }): NonNullable<StoredCertificateState['serving']> => {
    const c = cert(policy.servingValidityDays);
    return { ...c, notAfter: new Date(Math.min(c.notAfter.getTime(), ca.notAfter.getTime())), issuedByCa: true, namesMatch: true };
  };
  const live = (entries: { notAfter: Date }[]): { notBefore: Date; notAfter: Date }[] => entries.filter((e) => e.notAfter > now) as { notBefore: Date; notAfter: Date }[];
  switch (action) {
    case 'Create': {
      const ca = cert(policy.caValidityDays);
      return { ca, serving: serving(ca), bundle: { entries: [...live(state.bundle.entries), ca], holdsCa: true, holdsNextCa: false } };
    }
    case 'StageNextCa': {
      const next = { ...cert(policy.caValidityDays), stagedAt: now };
      return { ...state, nextCa: next, bundle: { entries: [...live(state.bundle.entries), next], holdsCa: true, holdsNextCa: true } };
    }
    case 'PromoteNextCa': {
      const ca = { notBefore: state.nextCa!.notBefore, notAfter: state.nextCa!.notAfter };
      return { ca, serving: serving(ca), bundle: { ...state.bundle, holdsCa: true, holdsNextCa: false } };
    }
    case 'RenewServing':
      return { ...state, serving: serving(state.ca!) };
    case 'RebuildBundle':
      return { ...state, bundle: { entries: live(state.bundle.entries), holdsCa: true, holdsNextCa: state.nextCa !== undefined } };
    case 'None':
      return state;
  }
}

describe('webhook certificates: planRotation', function () {
  it('creates everything when nothing is stored, then rests', function () {
    const empty: StoredCertificateState = { bundle: { entries: [], holdsCa: false, holdsNextCa: false } };
    assert.equal(planRotation(empty, at(0), policy), 'Create');
    assert.equal(planRotation(step(empty, 'Create', at(0)), at(1), policy), 'None');
  });

  it('renews the serving certificate 30 days before expiry, and one from the wrong CA or with wrong names at once', function () {
    const s = step({ bundle: { entries: [], holdsCa: false, holdsNextCa: false } }, 'Create', at(0));
    assert.equal(planRotation(s, at(59), policy), 'None');
    assert.equal(planRotation(s, at(61), policy), 'RenewServing');
    assert.equal(planRotation({ ...s, serving: { ...s.serving!, issuedByCa: false } }, at(1), policy), 'RenewServing');
    assert.equal(planRotation({ ...s, serving: { ...s.serving!, namesMatch: false } }, at(1), policy), 'RenewServing');
  });

  it('stages the next CA a year before expiry and promotes it only after the propagation delay', function () {
    let s = step({ bundle: { entries: [], holdsCa: false, holdsNextCa: false } }, 'Create', at(0));
    const stageDay = policy.caValidityDays - policy.caRenewBeforeDays + 1;
    s = step(s, 'RenewServing', at(stageDay - 1));
    assert.equal(planRotation(s, at(stageDay), policy), 'StageNextCa');
    s = step(s, 'StageNextCa', at(stageDay));
    assert.equal(planRotation(s, new Date(at(stageDay).getTime() + 1000), policy), 'None', 'serving stays on the old CA while the bundle propagates');
    assert.equal(planRotation(s, new Date(at(stageDay).getTime() + policy.propagationSeconds * 1000), policy), 'PromoteNextCa');
  });

  it('never lets the served certificate come from a CA missing in the bundle, over ten years of daily checks (property)', function () {
    fc.assert(fc.property(fc.array(fc.integer({ min: 1, max: 40 }), { minLength: 1, maxLength: 200 }), (gaps) => {
      let now = at(0);
      let s: StoredCertificateState = { bundle: { entries: [], holdsCa: false, holdsNextCa: false } };
      for (const gap of gaps) {
        now = new Date(now.getTime() + gap * DAY);
        for (let i = 0; i < 10; i += 1) {
          const action = planRotation(s, now, policy);
          if (action === 'None') break;
          assert.notEqual(i, 9, 'settles within a few steps');
          // A replica that checks at least monthly never has to recreate from scratch.
          if (action === 'Create') assert.equal(s.ca, undefined, `Create at ${now.toISOString()}`);
          s = step(s, action, now);
        }
        assert.ok(s.bundle.holdsCa);
        assert.ok(s.serving!.notAfter > now && s.serving!.notBefore <= now);
        assert.ok(s.ca!.notAfter > now);
      }
    }), { numRuns: 100 });
  });
});

describe('webhook certificates: PEM bundles', function () {
  it('merges without duplicates, drops expired CAs, and checks issuer and names', async function () {
    const old = await createCertificateAuthority('old', 1, new Date(Date.now() - 2 * DAY));
    const a = await createCertificateAuthority('a', 10);
    const b = await createCertificateAuthority('b', 10);
    const merged = mergeBundles(new Date(), a.certPem + old.certPem, b.certPem + a.certPem, 'garbage');
    assert.equal(splitPemBundle(merged).length, 2);
    assert.ok(bundleHolds(merged, a.certPem) && bundleHolds(merged, b.certPem) && !bundleHolds(merged, old.certPem));
    const leaf = await issueCertificate(a, { commonName: 'svc', dnsNames: ['svc.ns.svc'], ipAddresses: ['127.0.0.1'], usage: 'server', validityDays: 1 });
    assert.ok(issuedBy(leaf.certPem, a.certPem));
    assert.ok(!issuedBy(leaf.certPem, b.certPem));
    assert.ok(coversNames(leaf.certPem, ['svc.ns.svc'], ['127.0.0.1']));
    assert.ok(!coversNames(leaf.certPem, ['other.ns.svc'], []));
    assert.ok(!coversNames(leaf.certPem, [], ['::1']));
  });
});
