/** What the controller's pod cache keeps of a pod. */
import assert from 'node:assert/strict';
import { slimPod } from '../../src/controller/slim.ts';

describe('controller caches: slimPod', function () {
  it('keeps labels, poolkeeper annotations, container names, phase and Ready; drops the rest', function () {
    const pod = {
      metadata: {
        name: 'web-1', namespace: 'shop', uid: 'u1', resourceVersion: '7',
        labels: { app: 'web', 'poolkeeper.dev/connection': 'orders' },
        annotations: { 'poolkeeper.dev/injected': '0.1.0', 'poolkeeper.dev/sidecar-reads-tables': 'true', 'checksum/config': 'x'.repeat(4096) },
        managedFields: [{ manager: 'kubectl' }],
      },
      spec: { serviceAccountName: 'web', containers: [{ name: 'app', image: 'app:1', env: [{ name: 'A', value: 'b' }] }] },
      status: { phase: 'Running', conditions: [{ type: 'Ready', status: 'True' }, { type: 'PodScheduled', status: 'True' }], containerStatuses: [{ name: 'app' }] },
    };
    const slim = slimPod(pod as never) as typeof pod;
    assert.deepEqual(slim.metadata.labels, pod.metadata.labels);
    assert.deepEqual(slim.metadata.annotations, { 'poolkeeper.dev/injected': '0.1.0', 'poolkeeper.dev/sidecar-reads-tables': 'true' });
    assert.equal('managedFields' in slim.metadata, false);
    assert.deepEqual(slim.spec, { serviceAccountName: 'web', containers: [{ name: 'app' }] });
    assert.deepEqual(slim.status, { phase: 'Running', conditions: [{ type: 'Ready', status: 'True' }] });
    assert.equal(slim.metadata.uid, 'u1');
  });
});
