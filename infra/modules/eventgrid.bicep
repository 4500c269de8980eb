// Event Grid: the system topic on the storage account and its identity's right to write dead
// letters. The BlobCreated subscriptions themselves are in eventsubscription.bicep, a module that
// main.bicep deploys only if (deployEventSubscription): ARM may evaluate list* functions of a
// conditional resource even when its condition is false, so the subscriptions' listKeys() of
// the blobs_extension key must not be in a template that the first pass deploys.

param location string
param tags object
param systemTopicName string
param storageAccountName string
param deadletterContainerName string

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

output systemTopicName string = systemTopic.name
