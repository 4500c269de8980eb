// The BYOK workbook (infra/workbook.json) and the alert rules (infra/queries/*.kql).
// Both query the shared workspace: the pipeline's audit events in table AppTraces, its metrics
// in table AppMetrics (byok_pipeline/core/metrics.py), and the storage account's blob and queue
// logs (StorageBlobLogs, StorageQueueLogs).
//
// Alert windows: every rule runs every 5 minutes over the last 20 minutes, so a record that
// arrives late (Log Analytics ingestion usually takes a few minutes) is still inside the window;
// each query keeps only records ingested in the last 5 minutes, so a record alerts once.

param location string
param tags object
param appName string
param workspaceId string
param alertEmailAddress string

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appName, 'byok-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'BYOK imports (${appName})'
    category: 'workbook'
    version: 'Notebook/1.0'
    sourceId: workspaceId
    // fallbackResourceIds in workbook.json: the workspace, so the workbook opened from
    // Monitor > Workbooks (outside the workspace) queries the right data.
    serializedData: replace(loadTextContent('../workbook.json'), '__WORKSPACE_ID__', workspaceId)
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmailAddress)) {
  name: 'ag-${appName}-byok'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'byok-alerts'
    enabled: true
    emailReceivers: [
      {
        name: 'byok-operators'
        emailAddress: alertEmailAddress
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroupIds = empty(alertEmailAddress) ? [] : [
  actionGroup.id
]

// Severity 1 (error): the HSM holds a key that does not match its package.
resource verificationFailedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-verification-failed'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: imported key failed verification'
    description: 'A byok.verification_failed audit event: the key in Managed HSM does not match its package. Investigate before the key is used.'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT20M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-verification-failed.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Severity 2 (warning): packages could not be imported. A count, from the metric byok.packages
// (state "failed"), one alert per reason code.
resource failedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-failed'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: package import failed'
    description: 'Packages ended failed (metric byok.packages, state failed, by reason_code): they could not be imported into Managed HSM. The Failures panel of the workbook and byok status --state failed name them.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT20M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-failed.kql')
          timeAggregation: 'Total'
          metricMeasureColumn: 'failed'
          dimensions: [
            {
              name: 'reason_code'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Severity 2 (warning): Event Grid could not deliver a BlobCreated event and dead-lettered it.
resource deadletterAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-deadletter'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: Event Grid event dead-lettered'
    description: 'Event Grid wrote an undeliverable BlobCreated event to byok-deadletter. The package waits until the reconcile timer picks it up; check the Function endpoint and the dead letter.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT20M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-deadletter.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Severity 2 (warning): the blob trigger gave up on a package (poison queue).
resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-poison'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: blob trigger message poisoned'
    description: 'The blob trigger failed a package 5 times and moved its message to webjobs-blobtrigger-poison. See the Function logs; the reconcile timer re-delivers packages still waiting.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT20M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-poison.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

output workbookId string = workbook.id
