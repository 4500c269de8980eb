// Event Grid: BlobCreated in the incoming container -> the blob trigger's extension endpoint.
// Delivery is at least once and unordered; the pipeline is idempotent on the package hash.
// Events that cannot be delivered are dead-lettered to a container, written with the system
// topic's own managed identity (the storage account accepts no shared keys).

param location string
param tags object
param systemTopicName string
param storageAccountName string
param functionAppName string
param functionName string
param incomingContainerName string
param deadletterContainerName string
param deployEventSubscription bool

var storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storageAccount
  name: 'default'
}

resource deadletterContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deadletterContainerName
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: storageAccount.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

// The topic's identity writes dead letters, and only into the dead-letter container.
resource deadletterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deadletterContainer.id, systemTopic.id, storageBlobDataContributor)
  scope: deadletterContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributor)
    principalId: systemTopic.identity.principalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm Event Grid system topic: write undeliverable events'
  }
}

// The endpoint of an Event Grid blob trigger, authenticated by the blobs_extension system key.
// That key exists only once the code is published, hence deployEventSubscription.
resource blobCreatedSubscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = if (deployEventSubscription) {
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
  dependsOn: [
    deadletterWriter
  ]
}

output systemTopicName string = systemTopic.name
