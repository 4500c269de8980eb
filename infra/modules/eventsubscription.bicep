// Event Grid: BlobCreated in the incoming container -> the blob trigger process_package, and
// BlobCreated in the approvals container (a manifest or a signed approval) -> the blob trigger
// process_approval, each through the blob extension's endpoint.
// Delivery is at least once and unordered; the pipeline is idempotent on the package hash.
// Events that cannot be delivered are dead-lettered to a container, written with the system
// topic's own managed identity (the storage account accepts no shared keys).
//
// main.bicep deploys this module only if (deployEventSubscription), i.e. on the second pass,
// once the code is published: the blobs_extension system key read below with listKeys() exists
// only then, and a module whose condition is false is not deployed, so its listKeys() is never
// evaluated on the first pass (a conditional resource's list* calls may be).

param systemTopicName string
param storageAccountName string
param functionAppName string
param functionName string
param approvalFunctionName string
param incomingContainerName string
param approvalsContainerName string
param deadletterContainerName string

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

// The endpoint of an Event Grid blob trigger, authenticated by the blobs_extension system key.
resource blobCreatedSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'byok-incoming-blob-created'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${functionApp.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${functionName}&code=${listKeys('${functionApp.id}/host/default', '2023-01-01').systemKeys.blobs_extension}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${incomingContainerName}/blobs/'
      isSubjectCaseSensitive: true
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storageAccount.id
          blobContainerName: deadletterContainerName
        }
      }
    }
  }
}

// A manifest or an approval arrived: a package awaiting approval is delivered again. Same
// delivery, retries and dead letters as the packages' subscription.
resource approvalCreatedSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'byok-approvals-blob-created'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${functionApp.properties.defaultHostName}/runtime/webhooks/blobs?functionName=Host.Functions.${approvalFunctionName}&code=${listKeys('${functionApp.id}/host/default', '2023-01-01').systemKeys.blobs_extension}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/${approvalsContainerName}/blobs/'
      isSubjectCaseSensitive: true
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'SystemAssigned'
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: storageAccount.id
          blobContainerName: deadletterContainerName
        }
      }
    }
  }
}
